//! The `mlp2x_gelu` multi-modal projector: CLIP features -> decoder embeddings.
use tch::Tensor;

use super::linear::Linear;
use super::weights::Vb;

pub struct Projector {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Projector {
    pub fn new(vb: &Vb, vision_dim: usize, text_dim: usize) -> Self {
        Projector {
            linear_1: Linear::new(&vb.pp("linear_1"), vision_dim, text_dim, true),
            linear_2: Linear::new(&vb.pp("linear_2"), text_dim, text_dim, true),
        }
    }

    /// An independent copy of the weights.
    pub fn frozen_copy(&self) -> Self {
        let copy = |l: &Linear| Linear {
            weight: l.weight.detach().copy(),
            bias: l.bias.as_ref().map(|b| b.detach().copy()),
            lora: None,
        };
        Projector { linear_1: copy(&self.linear_1), linear_2: copy(&self.linear_2) }
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 2] {
        [("multi_modal_projector.linear_1", &mut self.linear_1), ("multi_modal_projector.linear_2", &mut self.linear_2)]
    }

    pub fn forward(&self, features: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(features).gelu("none"))
    }
}
