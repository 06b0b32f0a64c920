//! LoRA adapters with PEFT semantics (`y = W x + B(A(dropout(x))) * scaling`), and the PEFT file format.
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

use crate::error::{read_json, Error, Result};
use crate::fsutil::{create_dir, write_atomic};
use crate::model::linear::Linear;
use crate::model::weights::{canonical_name, save_safetensors, Checkpoint};
use crate::model::LlavaNext;

/// Switches shared by every LoRA layer of one model: the adapter can be turned off (the DPO reference policy is
/// the same weights without it) and dropout only applies while training.
#[derive(Debug, Default)]
pub struct LoraSwitch {
    disabled: Cell<bool>,
    training: Cell<bool>,
}

impl LoraSwitch {
    pub fn set_enabled(&self, enabled: bool) {
        self.disabled.set(!enabled);
    }

    pub fn set_training(&self, training: bool) {
        self.training.set(training);
    }

    pub fn enabled(&self) -> bool {
        !self.disabled.get()
    }
}

pub struct LoraLayer {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    pub switch: Rc<LoraSwitch>,
}

impl LoraLayer {
    pub fn add_to(&self, y: Tensor, x: &Tensor) -> Tensor {
        if self.switch.disabled.get() {
            return y;
        }
        let x = x.to_kind(self.a.kind());
        let x = if self.switch.training.get() && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x };
        let delta = x.linear(&self.a, None::<Tensor>).linear(&self.b, None::<Tensor>) * self.scaling;
        if y.kind() == delta.kind() {
            y + delta
        } else {
            let kind = y.kind();
            (y.to_kind(Kind::Float) + delta.to_kind(Kind::Float)).to_kind(kind)
        }
    }

    /// `scaling * B @ A`, the change this adapter makes to the weight.
    pub fn delta_weight(&self) -> Tensor {
        self.b.to_kind(Kind::Float).matmul(&self.a.to_kind(Kind::Float)) * self.scaling
    }
}

/// What to adapt and how; serialised into configs and checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// Module names (`q_proj`, …) or `all-linear` (every linear layer of the language model except lm_head).
    pub target_modules: Vec<String>,
    /// Train the projector in full and save it as PEFT `modules_to_save`.
    #[serde(default)]
    pub train_projector: bool,
}

impl LoraSettings {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    fn targets(&self, module_path: &str) -> bool {
        let leaf = module_path.rsplit('.').next().unwrap_or(module_path);
        self.target_modules.iter().any(|t| t == "all-linear" || t == leaf || module_path.ends_with(&format!(".{t}")))
    }

    /// The regular expression PEFT gets as `target_modules`: it must not match the vision tower's q/k/v projections.
    fn peft_target_regex(modules: &[String]) -> String {
        let mut leaves: Vec<&str> = modules.iter().filter_map(|m| m.rsplit('.').next()).collect();
        leaves.sort();
        leaves.dedup();
        format!(r".*language_model.*\.({})", leaves.join("|"))
    }
}

const PEFT_PREFIX: &str = "base_model.model.";
const PROJECTOR: &str = "multi_modal_projector";

/// An adapter attached to a model: its LoRA layers live inside the model's `Linear`s; this keeps handles to
/// the same tensors for the optimiser and for saving.
pub struct Adapter {
    pub switch: Rc<LoraSwitch>,
    pub settings: LoraSettings,
    /// (PEFT key, tensor): `…lora_A.weight` / `…lora_B.weight`, then projector weights when trained.
    pub lora_params: Vec<(String, Tensor)>,
    pub projector_params: Vec<(String, Tensor)>,
}

fn lora_key(module: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}

/// The trained projector's master weights are f32 even on a bf16 model (see `Linear::forward`).
fn projector_params(model: &mut LlavaNext) -> Vec<(String, Tensor)> {
    model.original_projector = Some(model.multi_modal_projector.frozen_copy());
    let mut params = Vec::new();
    for (path, linear) in model.multi_modal_projector.linears_mut() {
        linear.weight = linear.weight.to_kind(Kind::Float).detach().set_requires_grad(true);
        params.push((format!("{PEFT_PREFIX}{path}.weight"), linear.weight.shallow_clone()));
        if let Some(bias) = linear.bias.as_mut() {
            *bias = bias.to_kind(Kind::Float).detach().set_requires_grad(true);
            params.push((format!("{PEFT_PREFIX}{path}.bias"), bias.shallow_clone()));
        }
    }
    params
}

impl Adapter {
    /// Adds fresh LoRA layers (A Kaiming-uniform with a = sqrt(5), B zero, both f32) to the targeted layers.
    pub fn inject(model: &mut LlavaNext, settings: &LoraSettings) -> Result<Self> {
        let switch = Rc::new(LoraSwitch::default());
        let device = model.device();
        let mut lora_params = Vec::new();
        for (path, linear) in model.language_model.decoder_linears_mut() {
            if !settings.targets(&path) {
                continue;
            }
            let (out_dim, in_dim) = (linear.out_features(), linear.in_features());
            let bound = 1.0 / (in_dim as f64).sqrt();
            let a = (Tensor::rand([settings.r as i64, in_dim], (Kind::Float, device)) * (2.0 * bound) - bound).set_requires_grad(true);
            let b = Tensor::zeros([out_dim, settings.r as i64], (Kind::Float, device)).set_requires_grad(true);
            lora_params.push((lora_key(&path, "A"), a.shallow_clone()));
            lora_params.push((lora_key(&path, "B"), b.shallow_clone()));
            linear.lora = Some(LoraLayer { a, b, scaling: settings.scaling(), dropout: settings.dropout, switch: switch.clone() });
        }
        if lora_params.is_empty() {
            return Err(Error::Input(format!("target_modules {:?} match no linear layer of the language model", settings.target_modules)));
        }
        let projector_params = if settings.train_projector { projector_params(model) } else { Vec::new() };
        model.adapter_switch = Some(switch.clone());
        Ok(Adapter { switch, settings: settings.clone(), lora_params, projector_params })
    }

    /// Loads a PEFT adapter folder (written by stic or by Python PEFT, llava-hf or original LLaVA module paths).
    /// With `trainable`, its tensors become f32 leaves that require grad (to continue training).
    pub fn load(model: &mut LlavaNext, dir: &Path, trainable: bool) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            return Err(Error::Input(format!("{} not found: --adapter must be a PEFT adapter folder", config_path.display())));
        }
        let config: serde_json::Value = read_json(&config_path)?;
        if config.get("peft_type").and_then(|v| v.as_str()).is_some_and(|t| t != "LORA") {
            return Err(Error::Input(format!("{}: only LORA adapters are supported", config_path.display())));
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if config.get(pattern).and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty()) {
                return Err(Error::Input(format!("{}: {pattern} is not supported", config_path.display())));
            }
        }
        let number = |k: &str| config.get(k).and_then(|v| v.as_f64());
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            return Err(Error::Input(format!(
                "{} not found (adapter_model.bin must be converted to safetensors first)",
                weights_path.display()
            )));
        }
        let ckpt = Checkpoint::open_files(&[weights_path.clone()])?;
        let device = model.device();
        let mut pairs: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
        let mut projector: BTreeMap<String, Tensor> = BTreeMap::new();
        let raw_names: Vec<String> = ckpt.raw_names().cloned().collect();
        for raw in raw_names {
            let t = ckpt.load_raw(&raw, Kind::Float, device)?;
            let path = raw.strip_prefix(PEFT_PREFIX).unwrap_or(&raw).replace(".default.", ".");
            if let Some((module, which)) = path.strip_suffix(".weight").and_then(|p| p.rsplit_once(".lora_")) {
                let slot = match which {
                    "A" => 0,
                    "B" => 1,
                    _ => return Err(Error::Input(format!("{}: unexpected tensor {raw}", weights_path.display()))),
                };
                pairs.entry(canonical_name(module)).or_default()[slot] = Some(t);
            } else {
                projector.insert(canonical_name(&path), t);
            }
        }
        let r = number("r").unwrap_or(8.0);
        let settings = LoraSettings {
            r: r as usize,
            alpha: number("lora_alpha").unwrap_or(8.0),
            dropout: number("lora_dropout").unwrap_or(0.0),
            use_rslora: config.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
            target_modules: pairs.keys().filter_map(|m| m.rsplit('.').next().map(String::from)).collect::<std::collections::BTreeSet<_>>().into_iter().collect(),
            train_projector: !projector.is_empty(),
        };
        let switch = Rc::new(LoraSwitch::default());
        let mut lora_params = Vec::new();
        let mut linears: BTreeMap<String, &mut Linear> = model.language_model.decoder_linears_mut().into_iter().collect();
        for (module, [a, b]) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Input(format!("{}: {module} lacks lora_A or lora_B", weights_path.display())));
            };
            let Some(linear) = linears.get_mut(&module) else {
                return Err(Error::Input(format!("{}: adapter targets {module}, which is not a language-model linear layer", weights_path.display())));
            };
            let rank = a.size()[0];
            if a.size() != [rank, linear.in_features()] || b.size() != [linear.out_features(), rank] {
                return Err(Error::Input(format!(
                    "{}: {module} has lora_A {:?} and lora_B {:?}, the layer is [{}, {}]",
                    weights_path.display(), a.size(), b.size(), linear.out_features(), linear.in_features()
                )));
            }
            let (a, b) = if trainable { (a.set_requires_grad(true), b.set_requires_grad(true)) } else { (a, b) };
            lora_params.push((lora_key(&module, "A"), a.shallow_clone()));
            lora_params.push((lora_key(&module, "B"), b.shallow_clone()));
            let scaling = if settings.use_rslora { settings.alpha / (rank as f64).sqrt() } else { settings.alpha / rank as f64 };
            linear.lora = Some(LoraLayer { a, b, scaling, dropout: settings.dropout, switch: switch.clone() });
        }
        let mut projector_params = Vec::new();
        if !projector.is_empty() {
            model.original_projector = Some(model.multi_modal_projector.frozen_copy());
            for (path, linear) in model.multi_modal_projector.linears_mut() {
                for (field, slot) in [("weight", Some(&mut linear.weight)), ("bias", linear.bias.as_mut())] {
                    let Some(slot) = slot else { continue };
                    let name = format!("{path}.{field}");
                    let Some(t) = projector.remove(&name) else {
                        return Err(Error::Input(format!("{}: the projector is saved without {name}", weights_path.display())));
                    };
                    if t.size() != slot.size() {
                        return Err(Error::Input(format!("{}: {name} has shape {:?}, expected {:?}", weights_path.display(), t.size(), slot.size())));
                    }
                    *slot = if trainable { t.set_requires_grad(true) } else { t.to_kind(slot.kind()) };
                    projector_params.push((format!("{PEFT_PREFIX}{name}"), slot.shallow_clone()));
                }
            }
            if let Some(extra) = projector.keys().next() {
                return Err(Error::Input(format!("{}: unexpected tensor {extra} (only LoRA and the projector are supported)", weights_path.display())));
            }
        }
        model.adapter_switch = Some(switch.clone());
        Ok(Adapter { switch, settings, lora_params, projector_params })
    }

    /// All trainable tensors (LoRA, then projector).
    pub fn parameters(&self) -> impl Iterator<Item = &(String, Tensor)> {
        self.lora_params.iter().chain(self.projector_params.iter())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT does, so that
    /// `PeftModel.from_pretrained` loads the folder as it is.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        create_dir(dir)?;
        let modules: Vec<String> = self
            .lora_params
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(PEFT_PREFIX)?.strip_suffix(".lora_A.weight").map(String::from))
            .collect();
        let config = serde_json::json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.settings.alpha,
            "lora_dropout": self.settings.dropout,
            "modules_to_save": if self.projector_params.is_empty() { serde_json::Value::Null } else { serde_json::json!([PROJECTOR]) },
            "peft_type": "LORA",
            "r": self.settings.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": LoraSettings::peft_target_regex(&modules),
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.settings.use_rslora,
        });
        let tensors: Vec<(String, Tensor)> = self.parameters().map(|(k, t)| (k.clone(), t.detach().to_device(Device::Cpu))).collect();
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&config).expect("json").as_bytes())
    }
}
