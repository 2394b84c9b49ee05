"""The `onnx` package on an exported model: validate it, then re-save it with external data.

    python onnx_check.py MODEL.onnx RESAVED.onnx

Runs onnx.checker.check_model(full_check=True) (structure, operator schemas, shape inference), then
writes RESAVED.onnx with every tensor of 1 KiB or more in `resaved.bin` beside it (the onnx package's
own writer), and prints JSON: {"ir_version", "opset", "initializers": [{"name", "location",
"offset", "length"}...]} as the onnx package reads them back.
"""
import json
import os
import sys

import onnx


def main():
    src, dst = sys.argv[1:3]
    onnx.checker.check_model(src, full_check=True)
    m = onnx.load(src)
    onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="resaved.bin", size_threshold=1024)
    back = onnx.load(dst, load_external_data=False)
    out = []
    for t in back.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        out.append({
            "name": t.name,
            "location": ext.get("location"),
            "offset": int(ext.get("offset", 0)) if ext else None,
            "length": int(ext["length"]) if "length" in ext else None,
        })
    print(json.dumps({
        "ir_version": back.ir_version,
        "opset": [o.version for o in back.opset_import],
        "initializers": out,
    }))


if __name__ == "__main__":
    main()
