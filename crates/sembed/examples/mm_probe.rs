use candle_core::DType;
fn rss() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1048576.0
}
fn main() {
    let arch =
        sembed::config::Architecture::from_file(std::path::Path::new("/tmp/q2l.json")).unwrap();
    let cpu = sembed::device::cpu();
    let w = sembed::weights::Weights::random(1, DType::F32, &cpu);
    let model = sembed::embed::build_model(&arch, &w).unwrap();
    println!("built {:.2} GiB", rss());
    let rows: Vec<Vec<u32>> = vec![(0..64).collect()];
    let r: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch = sembed::models::Batch::new(&r, false, None, &cpu).unwrap();
    println!("batch {:.2} GiB", rss());
    for i in 0..3 {
        let h = model.forward(&batch).unwrap();
        println!("forward {i} {:?}: {:.2} GiB", h.dims(), rss());
    }
}
