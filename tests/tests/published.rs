//! The paper's networks: our UNet builds the published guided-diffusion checkpoints' exact
//! parameter lists from the configs shipped in `models/configs/adm/`.

use davi_models::{UNetConfig, UNetModel};
use davi_tests::root;

fn count(config: &str) -> (usize, usize) {
    let cfg = UNetConfig::from_file(&root().join("models/configs/adm").join(config)).unwrap();
    let unet = UNetModel::new(&cfg).unwrap();
    (unet.num_params(), unet.param_shapes().len())
}

#[test]
fn ffhq_256_is_dps_ffhq_10m() {
    // DPS's ffhq_10m.pt: 93,563,910 parameters in 362 state-dict entries.
    assert_eq!(count("ffhq256.json"), (93_563_910, 362));
}

#[test]
fn imagenet_256_uncond_is_guided_diffusions_checkpoint() {
    // guided-diffusion's 256x256_diffusion_uncond.pt: 552,814,086 parameters, 566 entries.
    assert_eq!(count("imagenet256-uncond.json"), (552_814_086, 566));
}

#[test]
fn the_paper_task_configs_use_the_published_ffhq_unet() {
    let ffhq = UNetConfig::from_file(&root().join("models/configs/adm/ffhq256.json")).unwrap();
    let mut tasks = Vec::new();
    for e in std::fs::read_dir(root().join("models/configs/paper")).unwrap() {
        let p = e.unwrap().path();
        let cfg = davi_models::DaviConfig::from_file(&p).unwrap();
        assert_eq!(cfg.unet.image_size, 256, "{}", p.display());
        let n = UNetModel::new(&cfg.unet).unwrap().num_params();
        assert_eq!(
            n,
            UNetModel::new(&ffhq).unwrap().num_params(),
            "{}",
            p.display()
        );
        tasks.push(cfg.task().unwrap().operator.task());
    }
    tasks.sort();
    assert_eq!(tasks, ["colorize", "deblur", "denoise", "inpaint", "sr"]);
}
