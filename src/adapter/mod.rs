//! PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`): read, injected into a model,
//! saved, and folded into the base weights (`merge`).
pub mod merge;

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::fsutil::{create_dir, write_atomic};
use crate::model::linear::Linear;
use crate::model::weights::{canonical_name, save_safetensors, Checkpoint};
use crate::model::LlavaNext;

use crate::model::lora::{LoraLayer, LoraSettings, LoraSwitch};

const PEFT_PREFIX: &str = "base_model.model.";

/// The tensors of a PEFT adapter folder with canonical module paths (llava-hf older naming): LoRA pairs by
/// module, and fully trained modules (the projector).
pub struct AdapterFile {
    pub weights_path: std::path::PathBuf,
    pub settings: LoraSettings,
    /// module path -> (A [r, in], B [out, r]), f32
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
    /// canonical tensor name -> tensor, f32
    pub projector: BTreeMap<String, Tensor>,
}

impl AdapterFile {
    /// Reads `adapter_config.json` and `adapter_model.safetensors`; a pickled `adapter_model.bin` is refused
    /// (stic unpickles no adapters) with the command that converts it.
    pub fn read(dir: &Path, device: Device) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            return Err(Error::Input(format!(
                "{} not found: --adapter must be a PEFT adapter folder",
                config_path.display()
            )));
        }
        let config: serde_json::Value = read_json(&config_path)?;
        let peft =
            read_peft_settings(&config).map_err(|why| Error::Input(format!("{}: {why}", config_path.display())))?;
        let weights_path = dir.join("adapter_model.safetensors");
        let pickled = dir.join("adapter_model.bin");
        if !weights_path.is_file() && pickled.is_file() {
            return Err(Error::Input(format!(
                "{} is a pickle, which stic does not read (unpickling runs code); convert it once with \
                 python -c \"import torch; from safetensors.torch import save_file; \
                 save_file(torch.load('{p}', map_location='cpu', weights_only=True), '{s}', metadata={{'format': 'pt'}})\"",
                pickled.display(),
                p = pickled.display(),
                s = weights_path.display()
            )));
        }
        if !weights_path.is_file() {
            return Err(Error::Input(format!("{} not found", weights_path.display())));
        }
        let ckpt = Checkpoint::open_files(std::slice::from_ref(&weights_path))?;
        let mut halves: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
        let mut projector = BTreeMap::new();
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
                halves.entry(canonical_name(module)).or_default()[slot] = Some(t);
            } else {
                projector.insert(canonical_name(&path), t);
            }
        }
        let mut pairs = BTreeMap::new();
        for (module, [a, b]) in halves {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Input(format!("{}: {module} lacks lora_A or lora_B", weights_path.display())));
            };
            let rank = a.size()[0];
            if rank != peft.r as i64 {
                return Err(Error::Input(format!(
                    "{}: {module} has rank {rank} but {} says r {} (PEFT refuses such an adapter): correct r",
                    weights_path.display(),
                    config_path.display(),
                    peft.r
                )));
            }
            pairs.insert(module, (a, b));
        }
        let settings = LoraSettings {
            target_modules: pairs
                .keys()
                .filter_map(|m| m.rsplit('.').next().map(String::from))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            train_projector: !projector.is_empty(),
            ..peft
        };
        Ok(AdapterFile { weights_path, settings, pairs, projector })
    }

    /// `scaling * B @ A` of a pair, the change it makes to the layer's weight (f32).
    pub fn delta_weight(&self, a: &Tensor, b: &Tensor) -> Tensor {
        b.matmul(a) * self.settings.scaling()
    }
}

const PROJECTOR: &str = "multi_modal_projector";

/// An adapter attached to a model: its LoRA layers live inside the model's `Linear`s; this keeps handles to
/// the same tensors for the optimiser and for saving.
pub struct Adapter {
    pub switch: Rc<LoraSwitch>,
    pub settings: LoraSettings,
    /// (PEFT key, tensor): `…lora_A.weight` / `…lora_B.weight` of the trained layers.
    pub lora_params: Vec<(String, Tensor)>,
    /// LoRA tensors that are saved but never trained: the vision tower's (it runs without gradients) and those
    /// of vision layers that never run.
    pub frozen_params: Vec<(String, Tensor)>,
    pub projector_params: Vec<(String, Tensor)>,
}

fn lora_key(module: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}

/// `modules_to_save` go under the projector's module path in transformers ≥ 4.52 (`model.multi_modal_projector`):
/// PEFT remaps the older llava-hf paths of LoRA weights on load, but PEFT 0.21 on transformers 5 does not remap
/// those of `modules_to_save`.
fn projector_key(name: &str) -> String {
    format!("{PEFT_PREFIX}model.{name}")
}

/// PEFT `LoraConfig` entries that never change what a loaded adapter computes (the tensors say which layers are
/// adapted, and initialisation schemes only matter before training).
const INERT_PEFT_KEYS: &[&str] = &[
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_rslora",
];

/// The LoRA settings of a PEFT `adapter_config.json`, checked as PEFT would apply them: every other option must be
/// off (absent, null, false or empty), since stic computes plain LoRA only.
fn read_peft_settings(config: &serde_json::Value) -> std::result::Result<LoraSettings, String> {
    let entries = config.as_object().ok_or("it must be a JSON object")?;
    if let Some(kind) = entries.get("peft_type").filter(|t| t.as_str() != Some("LORA")) {
        return Err(format!("peft_type is {kind}: only LORA adapters are supported"));
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if entries.get(pattern).and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty()) {
            return Err(format!("{pattern} is not supported (one r and one lora_alpha for every layer)"));
        }
    }
    let off = |v: &serde_json::Value| {
        v.is_null()
            || v == false
            || v.as_object().is_some_and(|m| m.is_empty())
            || v.as_array().is_some_and(|a| a.is_empty())
    };
    for (key, value) in entries {
        let plain = match key.as_str() {
            "bias" => value.is_null() || value == "none",
            _ => INERT_PEFT_KEYS.contains(&key.as_str()) || off(value),
        };
        if !plain {
            return Err(format!(
                "{key} is {value}: stic applies plain LoRA and does not implement this PEFT option, which changes what \
                 the adapter computes; merge the adapter with PEFT (merge_and_unload) or train it without {key}"
            ));
        }
    }
    let given = |key: &str| entries.get(key).filter(|v| !v.is_null());
    let number = |key: &str, default: f64| match given(key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| format!("{key} is {v}: it must be a number")),
    };
    let settings = LoraSettings {
        // PEFT's LoraConfig defaults
        r: match given("r") {
            None => 8,
            Some(v) => v.as_u64().ok_or_else(|| format!("r is {v}: it must be a whole number"))? as usize,
        },
        alpha: number("lora_alpha", 8.0)?,
        dropout: number("lora_dropout", 0.0)?,
        use_rslora: match given("use_rslora") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| format!("use_rslora is {v}: it must be true or false"))?,
        },
        target_modules: Vec::new(),
        train_projector: false,
    };
    settings.validate()?;
    Ok(settings)
}

/// The trained projector's master weights are f32 even on a bf16 model (see `Linear::forward`).
fn projector_params(model: &mut LlavaNext) -> Vec<(String, Tensor)> {
    model.original_projector = Some(model.multi_modal_projector.frozen_copy());
    let mut params = Vec::new();
    for (path, linear) in model.multi_modal_projector.linears_mut() {
        linear.weight = linear.weight.to_kind(Kind::Float).detach().set_requires_grad(true);
        params.push((projector_key(&format!("{path}.weight")), linear.weight.shallow_clone()));
        if let Some(bias) = linear.bias.as_mut() {
            *bias = bias.to_kind(Kind::Float).detach().set_requires_grad(true);
            params.push((projector_key(&format!("{path}.bias")), bias.shallow_clone()));
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
            let a = (Tensor::rand([settings.r as i64, in_dim], (Kind::Float, device)) * (2.0 * bound) - bound)
                .set_requires_grad(true);
            let b = Tensor::zeros([out_dim, settings.r as i64], (Kind::Float, device)).set_requires_grad(true);
            lora_params.push((lora_key(&path, "A"), a.shallow_clone()));
            lora_params.push((lora_key(&path, "B"), b.shallow_clone()));
            linear.lora = Some(LoraLayer {
                a,
                b,
                scaling: settings.scaling(),
                dropout: settings.dropout,
                switch: switch.clone(),
            });
        }
        if lora_params.is_empty() {
            return Err(Error::Input(format!(
                "target_modules {:?} match no linear layer of the language model",
                settings.target_modules
            )));
        }
        let projector_params = if settings.train_projector { projector_params(model) } else { Vec::new() };
        model.adapter_switch = Some(switch.clone());
        Ok(Adapter { switch, settings: settings.clone(), lora_params, frozen_params: Vec::new(), projector_params })
    }

    /// Loads a PEFT adapter folder (written by stic or by Python PEFT, llava-hf or original LLaVA module paths).
    /// With `trainable`, its language-model tensors become f32 leaves that require grad (to continue training).
    /// LoRA on the vision tower is applied but never trained: the tower runs without gradients, as in LLaVA.
    pub fn load(model: &mut LlavaNext, dir: &Path, trainable: bool) -> Result<Self> {
        let file = AdapterFile::read(dir, model.device())?;
        let switch = Rc::new(LoraSwitch::default());
        let (mut lora_params, mut frozen_params) = (Vec::new(), Vec::new());
        let is_unbuilt = |module: &str| crate::model::llava_next::is_unbuilt_vision_linear(module, &model.cfg);
        let mut unbuilt = Vec::new();
        for module in file.pairs.keys() {
            if is_unbuilt(module)? {
                unbuilt.push(module.clone());
            }
        }
        let mut linears: BTreeMap<String, &mut Linear> =
            model.language_model.decoder_linears_mut().into_iter().collect();
        let vision: BTreeMap<String, &mut Linear> = model.vision_tower.linears_mut().into_iter().collect();
        let vision_modules: Vec<String> = vision.keys().cloned().collect();
        linears.extend(vision);
        for (module, (a, b)) in file.pairs {
            let keys = (lora_key(&module, "A"), lora_key(&module, "B"));
            if unbuilt.contains(&module) {
                // A layer past LLaVA's feature layer: it never runs, its weights are kept for saving.
                frozen_params.extend([(keys.0, a), (keys.1, b)]);
                continue;
            }
            let Some(linear) = linears.get_mut(&module) else {
                return Err(Error::Input(format!(
                    "{}: adapter targets {module}, which is not a linear layer of the model",
                    file.weights_path.display()
                )));
            };
            let rank = a.size()[0];
            if a.size() != [rank, linear.in_features()] || b.size() != [linear.out_features(), rank] {
                return Err(Error::Input(format!(
                    "{}: {module} has lora_A {:?} and lora_B {:?}, the layer is [{}, {}]",
                    file.weights_path.display(),
                    a.size(),
                    b.size(),
                    linear.out_features(),
                    linear.in_features()
                )));
            }
            let trained = trainable && !vision_modules.contains(&module);
            let (a, b) = if trained { (a.set_requires_grad(true), b.set_requires_grad(true)) } else { (a, b) };
            let params =
                if trained || !vision_modules.contains(&module) { &mut lora_params } else { &mut frozen_params };
            params.extend([(keys.0, a.shallow_clone()), (keys.1, b.shallow_clone())]);
            linear.lora = Some(LoraLayer {
                a,
                b,
                scaling: file.settings.scaling(),
                dropout: file.settings.dropout,
                switch: switch.clone(),
            });
        }
        let mut projector_params = Vec::new();
        let mut projector = file.projector;
        if !projector.is_empty() {
            model.original_projector = Some(model.multi_modal_projector.frozen_copy());
            for (path, linear) in model.multi_modal_projector.linears_mut() {
                for (field, slot) in [("weight", Some(&mut linear.weight)), ("bias", linear.bias.as_mut())] {
                    let Some(slot) = slot else { continue };
                    let name = format!("{path}.{field}");
                    let Some(t) = projector.remove(&name) else {
                        return Err(Error::Input(format!(
                            "{}: the projector is saved without {name}",
                            file.weights_path.display()
                        )));
                    };
                    if t.size() != slot.size() {
                        return Err(Error::Input(format!(
                            "{}: {name} has shape {:?}, expected {:?}",
                            file.weights_path.display(),
                            t.size(),
                            slot.size()
                        )));
                    }
                    *slot = if trainable { t.set_requires_grad(true) } else { t.to_kind(slot.kind()) };
                    projector_params.push((projector_key(&name), slot.shallow_clone()));
                }
            }
            if let Some(extra) = projector.keys().next() {
                return Err(Error::Input(format!(
                    "{}: unexpected tensor {extra} (only LoRA and the projector are supported)",
                    file.weights_path.display()
                )));
            }
        }
        model.adapter_switch = Some(switch.clone());
        Ok(Adapter { switch, settings: file.settings, lora_params, frozen_params, projector_params })
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
            .chain(&self.frozen_params)
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
        let tensors: Vec<(String, Tensor)> = self
            .parameters()
            .chain(&self.frozen_params)
            .map(|(k, t)| (k.clone(), t.detach().to_device(Device::Cpu)))
            .collect();
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&config).expect("json").as_bytes())
    }
}
