//! Safetensors reading: every dtype converted exactly, every header fault a distinct typed error naming
//! the file (and tensor), sharded checkpoints, and random corruption that never panics.

use proptest::prelude::*;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use sembed::error::{Error, WeightsError};
use sembed::weights::{parse_header, SafetensorsFile, WeightStore};
use sembed::DType;
use std::path::{Path, PathBuf};

/// Raw file: 8-byte length + header text + data.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A valid file written by the upstream `safetensors` crate, one tensor per dtype.
fn all_dtypes_file() -> Vec<u8> {
    let f32s: Vec<u8> = [1.5f32, -2.25, 0.0, 3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let f64s: Vec<u8> = [1.5f64, -2.25, 0.0, 3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let f16s: Vec<u8> = [1.5f32, -2.25, 0.0, 3.0]
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = [1.5f32, -2.25, 0.0, 3.0]
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    let i64s: Vec<u8> = [1i64, -2, 0, 3]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let i32s: Vec<u8> = [1i32, -2, 0, 3]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let i8s: Vec<u8> = [1i8, -2, 0, 3].iter().map(|x| *x as u8).collect();
    let u8s: Vec<u8> = vec![1, 254, 0, 3];
    let bools: Vec<u8> = vec![1, 0, 0, 1];
    let tensors = vec![
        (
            "f32",
            TensorView::new(StDtype::F32, vec![2, 2], &f32s).unwrap(),
        ),
        (
            "f64",
            TensorView::new(StDtype::F64, vec![2, 2], &f64s).unwrap(),
        ),
        (
            "f16",
            TensorView::new(StDtype::F16, vec![2, 2], &f16s).unwrap(),
        ),
        (
            "bf16",
            TensorView::new(StDtype::BF16, vec![2, 2], &bf16s).unwrap(),
        ),
        (
            "i64",
            TensorView::new(StDtype::I64, vec![4], &i64s).unwrap(),
        ),
        (
            "i32",
            TensorView::new(StDtype::I32, vec![4], &i32s).unwrap(),
        ),
        ("i8", TensorView::new(StDtype::I8, vec![4], &i8s).unwrap()),
        ("u8", TensorView::new(StDtype::U8, vec![4], &u8s).unwrap()),
        (
            "bool",
            TensorView::new(StDtype::BOOL, vec![4], &bools).unwrap(),
        ),
    ];
    safetensors::tensor::serialize(tensors, None).unwrap()
}

#[test]
fn every_dtype_converts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "all.safetensors", &all_dtypes_file());
    let f = SafetensorsFile::open(&p).unwrap();
    let cpu = sembed::device::cpu();
    let get = |n: &str| {
        f.load(n, DType::F32, &cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for n in ["f32", "f64", "f16", "bf16"] {
        assert_eq!(get(n), vec![1.5, -2.25, 0.0, 3.0], "{n}");
    }
    for n in ["i64", "i32", "i8"] {
        assert_eq!(get(n), vec![1.0, -2.0, 0.0, 3.0], "{n}");
    }
    assert_eq!(get("u8"), vec![1.0, 254.0, 0.0, 3.0]);
    assert_eq!(get("bool"), vec![1.0, 0.0, 0.0, 1.0]);
    // Explicit conversion to the other compute dtypes too.
    let h = f.load("f32", DType::BF16, &cpu).unwrap();
    assert_eq!(h.dtype(), DType::BF16);
    assert_eq!(
        h.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1.5, -2.25, 0.0, 3.0]
    );
}

fn fault(bytes: &[u8]) -> WeightsError {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.safetensors", bytes);
    let e = SafetensorsFile::open(&p).unwrap_err();
    assert!(
        e.to_string().contains("bad.safetensors"),
        "message names the file: {e}"
    );
    e
}

#[test]
fn each_fault_is_its_own_error() {
    assert!(matches!(
        fault(b"abc"),
        WeightsError::FileTooShort { len: 3, .. }
    ));
    assert!(matches!(
        fault(b""),
        WeightsError::FileTooShort { len: 0, .. }
    ));
    let mut too_long = 1000u64.to_le_bytes().to_vec();
    too_long.extend_from_slice(b"{}");
    assert!(matches!(
        fault(&too_long),
        WeightsError::HeaderBeyondFile {
            header_len: 1000,
            ..
        }
    ));
    let mut not_utf8 = 4u64.to_le_bytes().to_vec();
    not_utf8.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    assert!(matches!(
        fault(&not_utf8),
        WeightsError::HeaderNotUtf8 { .. }
    ));
    assert!(matches!(
        fault(&raw("{not json", b"")),
        WeightsError::HeaderNotJson { .. }
    ));
    let e = fault(&raw(
        r#"{"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    ));
    assert!(
        matches!(&e, WeightsError::UnknownDtype { tensor, dtype, .. } if tensor == "w" && dtype == "Q7"),
        "{e}"
    );
    let e = fault(&raw(
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 4],
    ));
    assert!(
        matches!(&e, WeightsError::OffsetsOutOfRange { tensor, .. } if tensor == "w"),
        "{e}"
    );
    let e = fault(&raw(
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
        &[0; 8],
    ));
    assert!(matches!(&e, WeightsError::OffsetsOutOfRange { .. }), "{e}");
    let e = fault(&raw(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    ));
    assert!(
        matches!(&e, WeightsError::Overlap { first, second, .. } if first == "a" && second == "b"),
        "{e}"
    );
    let e = fault(&raw(
        r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0; 8],
    ));
    assert!(
        matches!(&e, WeightsError::SizeMismatch { tensor, expected: 12, actual: 8, .. } if tensor == "w"),
        "{e}"
    );
    let e = fault(&raw(
        r#"{"w":{"dtype":"F32","data_offsets":[0,8]}}"#,
        &[0; 8],
    ));
    assert!(
        matches!(&e, WeightsError::BadEntry { tensor, .. } if tensor == "w"),
        "{e}"
    );
}

#[test]
fn missing_and_wrongly_shaped_tensors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &all_dtypes_file());
    let store = WeightStore::from_dir(dir.path()).unwrap();
    let cpu = sembed::device::cpu();
    let e = store.get("nope", &[1], DType::F32, &cpu).unwrap_err();
    assert!(
        matches!(&e, Error::Weights(WeightsError::MissingTensor { tensor, .. }) if tensor == "nope"),
        "{e}"
    );
    let e = store.get("f32", &[4], DType::F32, &cpu).unwrap_err();
    assert!(
        matches!(&e, Error::Weights(WeightsError::WrongShape { tensor, actual, expected, .. }) if tensor == "f32" && actual == &vec![2, 2] && expected == &vec![4]),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = WeightStore::from_dir(empty.path()).unwrap_err();
    assert!(matches!(e, Error::Weights(WeightsError::NoWeights { .. })));
}

#[test]
fn sharded_checkpoint_loads_through_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let b: Vec<u8> = [3.0f32].iter().flat_map(|x| x.to_le_bytes()).collect();
    let s1 = safetensors::tensor::serialize(
        vec![("a", TensorView::new(StDtype::F32, vec![2], &a).unwrap())],
        None,
    )
    .unwrap();
    let s2 = safetensors::tensor::serialize(
        vec![("b", TensorView::new(StDtype::F32, vec![1], &b).unwrap())],
        None,
    )
    .unwrap();
    write(dir.path(), "model-00001-of-00002.safetensors", &s1);
    write(dir.path(), "model-00002-of-00002.safetensors", &s2);
    write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    );
    let store = WeightStore::from_dir(dir.path()).unwrap();
    let cpu = sembed::device::cpu();
    assert_eq!(
        store
            .get("b", &[1], DType::F32, &cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![3.0]
    );
    assert_eq!(
        store
            .get("a", &[2], DType::F32, &cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1.0, 2.0]
    );
    // An index that maps a tensor to the wrong shard is an error naming both.
    write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"a":"model-00002-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    );
    let e = WeightStore::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("index") && e.contains("`a`"), "{e}");
    // A missing shard names the shard.
    write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"a":"missing.safetensors"}}"#,
    );
    let e = WeightStore::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Flip, truncate or overwrite bytes of a valid file: parsing and loading give a value or an
    /// error, never a panic.
    #[test]
    fn corrupted_files_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = all_dtypes_file();
        for (i, v) in flips {
            let at = i.index(bytes.len());
            bytes[at] = v;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len() + 1));
        }
        if let Ok(h) = parse_header(&bytes, Path::new("fuzz.safetensors")) {
            let dir = tempfile::tempdir().unwrap();
            let p = write(dir.path(), "fuzz.safetensors", &bytes);
            let f = SafetensorsFile::open(&p).unwrap();
            for t in &h.tensors {
                let _ = f.load(&t.name, DType::F32, &sembed::device::cpu());
            }
        }
    }

    /// Arbitrary headers (random JSON-ish text) never panic either.
    #[test]
    fn arbitrary_headers_never_panic(header in "\\{[ -~]{0,80}\\}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_header(&raw(&header, &data), Path::new("fuzz.safetensors"));
    }
}
