//! The building blocks shared by the vision tower and the decoder.
use tch::Tensor;

use super::weights::Vb;
use crate::lora::LoraLayer;

/// `nn.Linear` (weight [out, in]) with an optional LoRA adapter added to its output.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraLayer>,
}

impl Linear {
    pub fn new(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Self {
        let weight = vb.get(&[out_dim as i64, in_dim as i64], "weight");
        let bias = bias.then(|| vb.get(&[out_dim as i64], "bias"));
        Linear { weight, bias, lora: None }
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        // A trained projector keeps f32 weights inside a bf16 model.
        let y = if x.kind() == self.weight.kind() {
            x.linear(&self.weight, self.bias.as_ref())
        } else {
            x.to_kind(self.weight.kind()).linear(&self.weight, self.bias.as_ref()).to_kind(x.kind())
        };
        match &self.lora {
            Some(lora) => lora.add_to(y, x),
            None => y,
        }
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &Vb, dim: usize, eps: f64) -> Self {
        LayerNorm { weight: vb.get(&[dim as i64], "weight"), bias: vb.get(&[dim as i64], "bias"), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([*x.size().last().unwrap()], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// Mistral's RMSNorm: normalised in f32, cast back, then scaled (the order matters for bf16 parity).
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: &Vb, dim: usize, eps: f64) -> Self {
        RmsNorm { weight: vb.get(&[dim as i64], "weight"), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(tch::Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, tch::Kind::Float);
        let h = h * (variance + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}
