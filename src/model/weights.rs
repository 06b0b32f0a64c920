//! Memory-mapped safetensors checkpoints (single file or sharded) with tensor names mapped to one canonical
//! naming, the older llava-hf module paths, whatever layout the files use.
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::error::{read_json, Error, Result};

/// Maps a tensor name of any supported layout (llava-hf older/newer, original LLaVA) to the older llava-hf path.
pub fn canonical_name(key: &str) -> String {
    const RULES: [(&str, &str); 9] = [
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.vision_tower.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    ];
    for (from, to) in RULES {
        if let Some(rest) = key.strip_prefix(from) {
            return with_clip_vision_model(format!("{to}{rest}"));
        }
    }
    with_clip_vision_model(key.to_string())
}

/// transformers 5 builds CLIP's vision tower without the `vision_model.` level (and saves a model built from a
/// config that way): `vision_tower.embeddings…` is `vision_tower.vision_model.embeddings…`.
fn with_clip_vision_model(name: String) -> String {
    const CLIP_MODULES: [&str; 4] = ["embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."];
    match name.strip_prefix("vision_tower.") {
        Some(rest) if CLIP_MODULES.iter().any(|m| rest.starts_with(m)) => format!("vision_tower.vision_model.{rest}"),
        _ => name,
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a checkpoint, read lazily from memory-mapped files.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    /// canonical name -> (file index, name in the file)
    index: HashMap<String, (usize, String)>,
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let index: Index = read_json(&index_path)?;
        let mut names: Vec<String> = index.weight_map.into_values().collect();
        names.sort();
        names.dedup();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("adapter_")))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::Weights(format!(
            "no model.safetensors, model.safetensors.index.json or *.safetensors in {}",
            dir.display()
        )));
    }
    Ok(found)
}

impl Checkpoint {
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(&safetensors_files(dir)?)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| {
                Error::Weights(format!("cannot open {} (listed in the checkpoint): {e}", path.display()))
            })?;
            // SAFETY: the mapping is read-only; a file changed by another process while mapped is outside our contract.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::Weights(format!("{} is not a valid safetensors file (truncated or corrupt?): {e}", path.display()))
            })?;
            let file_idx = files.len();
            for name in metadata.tensors().keys() {
                index.insert(canonical_name(name), (file_idx, name.clone()));
            }
            files.push(MappedFile { path: path.clone(), mmap, data_start: 8 + header_len, metadata });
        }
        Ok(Checkpoint { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The stored dtype of a tensor.
    pub fn kind_of(&self, name: &str) -> Option<Kind> {
        let (f, key) = self.index.get(name)?;
        match self.files[*f].metadata.info(key)?.dtype {
            Dtype::BF16 => Some(Kind::BFloat16),
            Dtype::F16 => Some(Kind::Half),
            Dtype::F32 => Some(Kind::Float),
            _ => None,
        }
    }

    /// Tensor names as stored in the files.
    pub fn raw_names(&self) -> impl Iterator<Item = &String> {
        self.index.values().map(|(_, raw)| raw)
    }

    /// Loads a tensor by its stored name.
    pub fn load_raw(&self, raw: &str, kind: Kind, device: Device) -> Result<Tensor> {
        self.load(&canonical_name(raw), kind, device)?.ok_or_else(|| Error::Weights(format!("missing tensor {raw}")))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        let (f, key) = self.index.get(name)?;
        let info = self.files[*f].metadata.info(key)?;
        Some(info.shape.iter().map(|&d| d as i64).collect())
    }

    /// Copies one tensor out of the mapped file, converted to `kind` on `device`.
    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let Some((f, key)) = self.index.get(name) else { return Ok(None) };
        let file = &self.files[*f];
        let info = file.metadata.info(key).expect("indexed tensor has metadata");
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let stored = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            other => {
                return Err(Error::Weights(format!(
                    "{} in {}: dtype {other:?} is not supported (expected f32, f16 or bf16)",
                    key,
                    file.path.display()
                )))
            }
        };
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(bytes, &shape, stored)?;
        Ok(Some(tensor.f_to_device_(device, kind, false, false)?))
    }
}

enum Backing<'a> {
    Checkpoint(&'a Checkpoint),
    /// Fresh random tensors (for `init-tiny`), remembered so they can be saved.
    Random(RefCell<Vec<(String, Tensor)>>),
}

/// Hands out the tensors a model asks for by module path, and remembers every missing or mis-shaped one so that
/// a broken checkpoint is reported in one message naming all of them.
pub struct WeightSource<'a> {
    backing: Backing<'a>,
    kind: Kind,
    device: Device,
    problems: RefCell<Vec<String>>,
    /// The names the model asked for (or checked for).
    requested: RefCell<HashSet<String>>,
}

impl<'a> WeightSource<'a> {
    pub fn new(checkpoint: &'a Checkpoint, kind: Kind, device: Device) -> Self {
        Self::with_backing(Backing::Checkpoint(checkpoint), kind, device)
    }

    /// Random weights with the init of a freshly constructed transformers model (normal(0, 0.02); norms near 1).
    pub fn random(kind: Kind, device: Device) -> Self {
        Self::with_backing(Backing::Random(RefCell::new(Vec::new())), kind, device)
    }

    fn with_backing(backing: Backing<'a>, kind: Kind, device: Device) -> Self {
        WeightSource { backing, kind, device, problems: RefCell::new(Vec::new()), requested: RefCell::new(HashSet::new()) }
    }

    pub fn root(&self) -> Vb<'_, 'a> {
        Vb { source: self, prefix: String::new() }
    }

    /// The tensors handed out by a random source, by name.
    pub fn into_generated(self) -> Vec<(String, Tensor)> {
        match self.backing {
            Backing::Random(generated) => generated.into_inner(),
            Backing::Checkpoint(_) => Vec::new(),
        }
    }

    /// Fails with every problem recorded while the model was built, and with the checkpoint's tensors that the
    /// model never asked for unless `may_be_unused` allows them (a tensor of another architecture or layout is
    /// refused rather than silently dropped).
    pub fn finish(self, may_be_unused: impl Fn(&str) -> bool) -> Result<()> {
        let mut problems = self.problems.into_inner();
        let mut location = String::new();
        if let Backing::Checkpoint(ckpt) = &self.backing {
            let requested = self.requested.into_inner();
            let mut unknown: Vec<&String> = ckpt.index.iter().filter(|(name, _)| !requested.contains(*name) && !may_be_unused(name)).map(|(_, (_, raw))| raw).collect();
            unknown.sort();
            problems.extend(unknown.into_iter().map(|raw| format!("unknown tensor {raw}: stic maps the llava-hf and original LLaVA layouts of LLaVA-NeXT-Mistral; is this checkpoint of another model?")));
            if let Some(file) = ckpt.files.first() {
                location = format!(" {}", file.path.parent().unwrap_or(&file.path).display());
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 12;
        let mut msg = format!("{} problem(s) in the checkpoint{location}:\n  {}", problems.len(), problems[..problems.len().min(SHOWN)].join("\n  "));
        if problems.len() > SHOWN {
            msg.push_str(&format!("\n  … and {} more", problems.len() - SHOWN));
        }
        Err(Error::Weights(msg))
    }

    fn contains(&self, name: &str) -> bool {
        self.requested.borrow_mut().insert(name.to_string());
        match &self.backing {
            Backing::Checkpoint(c) => c.contains(name),
            Backing::Random(generated) => generated.borrow().iter().any(|(n, _)| n == name),
        }
    }

    fn fetch(&self, name: &str, shape: &[i64]) -> Tensor {
        self.requested.borrow_mut().insert(name.to_string());
        let checkpoint = match &self.backing {
            Backing::Checkpoint(c) => *c,
            Backing::Random(generated) => {
                let t = random_init(name, shape, self.kind, self.device);
                generated.borrow_mut().push((name.to_string(), t.shallow_clone()));
                return t;
            }
        };
        let placeholder = || Tensor::zeros([0], (self.kind, Device::Cpu));
        match checkpoint.shape(name) {
            None => {
                self.problems.borrow_mut().push(format!("missing tensor {name}"));
                placeholder()
            }
            Some(found) if found != shape => {
                self.problems.borrow_mut().push(format!("{name}: shape {found:?}, expected {shape:?}"));
                placeholder()
            }
            Some(_) => match checkpoint.load(name, self.kind, self.device) {
                Ok(t) => t.expect("present"),
                Err(e) => {
                    self.problems.borrow_mut().push(e.to_string());
                    placeholder()
                }
            },
        }
    }
}

fn random_init(name: &str, shape: &[i64], kind: Kind, device: Device) -> Tensor {
    let noise = Tensor::randn(shape, (Kind::Float, device));
    let is_norm_scale = name.ends_with("norm.weight") || name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name.ends_with("layrnorm.weight");
    let t = if is_norm_scale { noise * 0.1 + 1.0 } else { noise * 0.02 };
    t.to_kind(kind)
}

/// Writes tensors as a safetensors file with `{"format": "pt"}` metadata (what transformers expects), through a
/// temporary file renamed into place so that a crash or a full disk never leaves a partial file behind.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    struct Bytes {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &Bytes {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let (dtype, stored) = match t.kind() {
            Kind::Float => (Dtype::F32, t),
            Kind::BFloat16 => (Dtype::BF16, t),
            Kind::Half => (Dtype::F16, t),
            Kind::Int64 => (Dtype::I64, t),
            _ => (Dtype::F32, t.to_kind(Kind::Float)),
        };
        let numel = stored.numel();
        let mut data = vec![0u8; numel * stored.kind().elt_size_in_bytes()];
        stored.copy_data_u8(&mut data, numel);
        views.push((name.clone(), Bytes { dtype, shape: stored.size().iter().map(|&d| d as usize).collect(), data }));
    }
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(views.iter().map(|(n, b)| (n.as_str(), b)), metadata)
        .map_err(|e| Error::Weights(format!("cannot serialise {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// A module path into a [`WeightSource`], like `language_model.model.layers.3`.
#[derive(Clone)]
pub struct Vb<'s, 'a> {
    source: &'s WeightSource<'a>,
    prefix: String,
}

impl<'s, 'a> Vb<'s, 'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Vb { source: self.source, prefix }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    pub fn get(&self, shape: &[i64], name: &str) -> Tensor {
        self.source.fetch(&self.path(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.path(name))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn kind(&self) -> Kind {
        self.source.kind
    }

    pub fn device(&self) -> Device {
        self.source.device
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn every_layout_maps_to_the_older_llava_hf_names() {
        let clip = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight";
        for key in [
            clip,
            "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
            "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        ] {
            assert_eq!(canonical_name(key), clip, "{key}");
        }
        for (key, canonical) in [
            ("vision_tower.embeddings.patch_embedding.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight"),
            ("vision_tower.pre_layrnorm.bias", "vision_tower.vision_model.pre_layrnorm.bias"),
            ("vision_tower.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.weight"),
            ("model.language_model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.mlp.up_proj.weight"),
            ("lm_head.weight", "language_model.lm_head.weight"),
            ("model.image_newline", "image_newline"),
        ] {
            assert_eq!(canonical_name(key), canonical, "{key}");
        }
    }
}
