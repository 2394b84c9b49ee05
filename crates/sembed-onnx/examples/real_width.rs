//! Export a model at a published width (random weights; the real config), past protobuf's 2 GiB, and
//! check the graph in ONNX Runtime against sembed.
//!
//!     cargo run --release -p sembed-onnx --example real_width -- \
//!         ../shared/real-configs/qwen3-embedding-0.6b .venv-ci/bin/python [WORKDIR]
//!
//! Writes a model folder (the published config.json and sentence-transformers files, the tiny Qwen
//! fixture's tokenizer, random bf16 weights of every shape the config asks for), exports it (the
//! weights go to `model.onnx_data` on their own: f32 weights over 2 GiB), runs ONNX Runtime on a padded
//! batch with tools/onnx/run_ort.py, and prints the largest difference from sembed's vectors.

use sembed::weights::{tensor_bytes, write_safetensors, Dtype, Weights};
use sembed::{DType, Embed, EmbedOptions, Embedder};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, python, rest @ ..] = args.as_slice() else {
        eprintln!("usage: real_width CONFIG_DIR PYTHON [WORKDIR]");
        std::process::exit(2);
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let work = rest
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sembed-real-width"));
    let model = work.join("model");
    let _ = std::fs::remove_dir_all(&work);
    copy_tree(Path::new(config), &model);
    let tiny = root.join("tests/fixtures/qwen3-causal-tiny");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny.join(f), model.join(f)).unwrap();
    }
    if !model.join("modules.json").is_file() {
        std::fs::copy(tiny.join("modules.json"), model.join("modules.json")).unwrap();
    }
    // Every tensor the architecture asks for, random (norms 1, biases 0), stored in bf16.
    let arch = sembed::config::Architecture::from_file(&model.join("config.json")).unwrap();
    let shapes = Weights::zeros(DType::F32, &sembed::device::cpu());
    drop(sembed::embed::build_model(&arch, &shapes).unwrap());
    let random = Weights::random(7, DType::F32, &sembed::device::cpu());
    let t = Instant::now();
    let mut tensors = Vec::new();
    for (name, shape) in shapes.requested() {
        let v = random.get(&shape, &name).unwrap();
        tensors.push((
            name,
            Dtype::BF16,
            shape,
            tensor_bytes(&v, Dtype::BF16).unwrap(),
        ));
    }
    let params: usize = tensors.iter().map(|t| t.2.iter().product::<usize>()).sum();
    write_safetensors(
        &model.join("model.safetensors"),
        &tensors,
        Default::default(),
    )
    .unwrap();
    drop(tensors);
    println!(
        "{}: {} ({params} parameters), random bf16 weights written in {:.1} s",
        config,
        arch.name(),
        t.elapsed().as_secs_f64()
    );

    let out = work.join("onnx-export");
    let t = Instant::now();
    let r = sembed_onnx::export(&model, &out, &Default::default()).unwrap();
    let data = r
        .external_data
        .clone()
        .expect("past 2 GiB the weights go to external data");
    println!(
        "exported in {:.1} s: model.onnx {} bytes, model.onnx_data {} bytes, {} nodes",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(&r.model).unwrap().len(),
        std::fs::metadata(&data).unwrap().len(),
        r.nodes
    );
    let summary = sembed_onnx::inspect(&r.model).unwrap();
    assert_eq!(summary.parameters(), r.parameters);

    let e = Embedder::load(&model, DType::F32, &sembed::device::cpu()).unwrap();
    let texts: Vec<String> = [
        "fn main() { println!(\"hello\"); }",
        "how do I sort a list of numbers in place without allocating a second list?",
        "x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Jina exports every task, selected by `task_id`: check the first.
    let (opts, task_id) = match &arch {
        sembed::config::Architecture::Jina(c) => (
            EmbedOptions {
                task: Some(c.lora_adaptations[0].clone()),
                ..Default::default()
            },
            Some(0),
        ),
        _ => (EmbedOptions::default(), None),
    };
    let ids = e.tokenize(&texts, &opts).unwrap();
    let want = e.embed(&texts, &opts).unwrap();
    let left = e.folder().tokenizer.padding_side_left;
    let inp = work.join("in.json");
    let outp = work.join("out.json");
    std::fs::write(
        &inp,
        serde_json::json!({"rows": ids, "padding": if left {"left"} else {"right"}, "pad_id": 0, "task_id": task_id})
            .to_string(),
    )
    .unwrap();
    let t = Instant::now();
    let st = std::process::Command::new(python)
        .arg(root.join("tools/onnx/run_ort.py"))
        .args([&r.model, &inp, &outp])
        .status()
        .unwrap();
    assert!(st.success());
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();
    let mut diff = 0f64;
    for (g, w) in got["sentence_embedding"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&want)
    {
        for (a, b) in g.as_array().unwrap().iter().zip(w) {
            diff = diff.max((a.as_f64().unwrap() - *b as f64).abs());
        }
    }
    println!(
        "ONNX Runtime (load + run, {:.1} s) vs sembed ({}): largest difference {diff:.2e} over {} texts",
        t.elapsed().as_secs_f64(),
        e.engine_name(),
        texts.len()
    );
    assert!(diff <= 1e-5, "{diff}");
    let _ = std::fs::remove_dir_all(&work);
}
