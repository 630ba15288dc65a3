//! The implicit posterior network `I_phi` of DAVI: one evaluation of the UNet maps a perturbed
//! lifted measurement to a posterior sample.

use crate::card::DaviConfig;
use crate::schedule::{Bridge, Diffusion};
use crate::{Backend, Operator, Result, UNetModel};
use ndarray::{ArrayD, IxDyn};

/// `I_phi`: the UNet, the operator whose measurements it inverts, and the bridge it starts from.
#[derive(Debug, Clone)]
pub struct Implicit {
    /// The network `F_phi` (first `channels` output channels are used).
    pub unet: UNetModel,
    /// The degradation operator `H`.
    pub operator: Operator,
    /// The Perturbed Posterior Bridge.
    pub bridge: Bridge,
    /// The perturbation `h` of the bridge.
    pub h: f64,
    /// Image channels `C`.
    pub channels: usize,
    /// Image side `S`.
    pub size: usize,
}

impl Implicit {
    /// Builds `I_phi` from a model config.
    pub fn new(cfg: &DaviConfig) -> Result<Self> {
        let unet = UNetModel::new(&cfg.unet)?;
        let diffusion = Diffusion::new(cfg.diffusion.bridge(), cfg.diffusion.steps);
        let channels = cfg.unet.in_channels;
        let size = cfg.unet.image_size;
        let task = cfg.task()?;
        task.operator.validate(channels, size)?;
        Ok(Self {
            unet,
            operator: task.operator.clone(),
            bridge: Bridge::new(&diffusion),
            h: task.h,
            channels,
            size,
        })
    }

    /// The last bridge step, `T - 1`, where inference starts.
    pub fn last_step(&self) -> usize {
        self.bridge.steps() - 1
    }

    /// A per-sample column `[N, 1, 1, 1]` of host values.
    fn column<B: Backend>(b: &B, v: &[f64]) -> B::Tensor {
        b.constant(
            ArrayD::from_shape_vec(
                IxDyn(&[v.len(), 1, 1, 1]),
                v.iter().map(|&x| x as f32).collect(),
            )
            .expect("column"),
        )
    }

    /// A bridge sample `x_a = mu0(a) x0 + mu1(a) y_lift + h (1 - ab_a) z`, one `a` per sample.
    ///
    /// # Shapes
    /// - `x0`, `y_lift`, `z`: [N, C, S, S]; `steps`: N values -> [N, C, S, S]
    pub fn bridge_sample<B: Backend>(
        &self,
        b: &B,
        x0: &B::Tensor,
        y_lift: &B::Tensor,
        z: &B::Tensor,
        steps: &[usize],
    ) -> B::Tensor {
        let cs: Vec<_> = steps
            .iter()
            .map(|&a| self.bridge.coeffs(a, self.h))
            .collect();
        let mu0 = Self::column(b, &cs.iter().map(|c| c.mu0).collect::<Vec<_>>());
        let mu1 = Self::column(b, &cs.iter().map(|c| c.mu1).collect::<Vec<_>>());
        let ns = Self::column(b, &cs.iter().map(|c| c.noise_scale).collect::<Vec<_>>());
        let x = b.add(&b.mul(x0, &mu0), &b.mul(y_lift, &mu1));
        b.add(&x, &b.mul(z, &ns))
    }

    /// The output map `x_hat = tanh(x_a - sigma_fwd(a) F_phi(x_a, a))`.
    ///
    /// `steps` holds one step per sample, or a single step shared by the whole batch.
    pub fn output_map<B: Backend>(
        &self,
        b: &B,
        x_a: &B::Tensor,
        steps: &[usize],
    ) -> Result<B::Tensor> {
        let t: Vec<f32> = steps.iter().map(|&a| a as f32).collect();
        let out = self.unet.forward(b, x_a, &t, None)?; // [N, out_channels, S, S]
        Ok(self.output_from(b, x_a, steps, out))
    }

    /// The output map given the network's output `out = F_phi(x_a, a)` [N, out_channels, S, S]
    /// (computed by the caller, e.g. block by block with gradient checkpointing).
    pub fn output_from<B: Backend>(
        &self,
        b: &B,
        x_a: &B::Tensor,
        steps: &[usize],
        out: B::Tensor,
    ) -> B::Tensor {
        let f = if self.unet.config.out_channels == self.channels {
            out
        } else {
            b.narrow(&out, 1, 0, self.channels)
        };
        let sig: Vec<f64> = steps
            .iter()
            .map(|&a| self.bridge.coeffs(a, self.h).sigma_fwd)
            .collect();
        let scaled = if sig.len() == 1 {
            b.scale(&f, sig[0] as f32)
        } else {
            b.mul(&f, &Self::column(b, &sig))
        };
        b.tanh(&b.sub(x_a, &scaled))
    }

    /// One-step restoration, the deployed graph: lift, bridge endpoint at `a = T - 1`
    /// (`x_a = y_lift + h (1 - ab) z`), output map.
    ///
    /// # Shapes
    /// - `measurement`: [N, Cy, Hy, Wy]; `noise`: [N, C, S, S] -> [N, C, S, S]
    pub fn restore<B: Backend>(
        &self,
        b: &B,
        measurement: &B::Tensor,
        noise: &B::Tensor,
    ) -> Result<B::Tensor> {
        let a = self.last_step();
        let c = self.bridge.coeffs(a, self.h);
        let y_lift = self.operator.lift(b, measurement, self.channels, self.size);
        // At a = T-1, mu0 = 0 and mu1 = 1 exactly: the x0 term drops out.
        let x_a = if c.noise_scale == 0.0 {
            y_lift
        } else {
            b.add(&y_lift, &b.scale(noise, c.noise_scale as f32))
        };
        self.output_map(b, &x_a, &[a])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;

    fn config(bridge: &str) -> DaviConfig {
        serde_yaml::from_str(&format!(
            "name: t\nunet: {{image_size: 16, in_channels: 1, model_channels: 32, out_channels: 1, \
             num_res_blocks: 1, channel_mult: [1]}}\ndiffusion: {{schedule: linear, steps: 1000{bridge}}}\n\
             task: {{operator: {{task: denoise}}, sigma_y: 0.1, h: 0.1}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn the_bridge_has_its_own_schedule_when_the_config_names_one() {
        let old = Implicit::new(&config("")).unwrap();
        let i2sb = Implicit::new(&config(", bridge_schedule: i2sb")).unwrap();
        let lin = Bridge::new(&Diffusion::new(BetaSchedule::Linear, 1000));
        let want = Bridge::new(&Diffusion::new(BetaSchedule::I2sb, 1000));
        let last = |b: &Bridge| b.coeffs(999, 0.1);
        assert_eq!(
            last(&old.bridge),
            last(&lin),
            "absent: the prior's schedule"
        );
        assert_eq!(last(&i2sb.bridge), last(&want));
        // The official bridge's output scale: sqrt of the symmetric i2sb betas' sum.
        let b = BetaSchedule::I2sb.betas(1000);
        let s = 2.0 * b[..500].iter().sum::<f64>();
        assert!((last(&i2sb.bridge).sigma_fwd - s.sqrt()).abs() < 1e-12);
        assert!(last(&i2sb.bridge).sigma_fwd < last(&lin).sigma_fwd);
    }
}
