//! Memory-mapped checkpoints (safetensors or PyTorch `.bin` zip archives, single file or sharded) with tensor
//! names mapped to one canonical naming, the older llava-hf module paths, whatever layout the files use.
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::model::pickle;

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
}

/// Where one tensor's elements lie in a mapped file.
struct StoredTensor {
    file: usize,
    raw_name: String,
    /// The stored element type, or its name when stic does not read it.
    dtype: std::result::Result<Kind, String>,
    shape: Vec<i64>,
    /// In elements.
    strides: Vec<i64>,
    /// The bytes from the tensor's first element to past its last one.
    bytes: Range<usize>,
}

/// The tensors of a checkpoint, read lazily from memory-mapped safetensors files or `torch.save` zip archives.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    /// canonical name -> where the tensor is
    index: HashMap<String, StoredTensor>,
}

/// The shards an index file (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) names.
fn shards_of_index(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = read_json(index_path)?;
    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    let shards: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
        return Err(Error::Weights(format!(
            "{} names the shard {}, which is not there: download the missing shard again (or the whole model \
             folder)",
            index_path.display(),
            missing.display()
        )));
    }
    Ok(shards)
}

/// The weight files of a model folder: safetensors when there are any (index, single file, or every
/// `*.safetensors`), else PyTorch pickle shards (`pytorch_model.bin.index.json`, `pytorch_model*.bin`).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for (index, single, is_shard) in [
        ("model.safetensors.index.json", "model.safetensors", is_safetensors_file as fn(&str) -> bool),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", is_pytorch_file),
    ] {
        let index_path = dir.join(index);
        if index_path.is_file() {
            return shards_of_index(dir, &index_path);
        }
        let single = dir.join(single);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| is_shard(&n.to_string_lossy())))
            .collect();
        if !found.is_empty() {
            found.sort();
            return Ok(found);
        }
    }
    Err(Error::Weights(format!(
        "no model.safetensors, model.safetensors.index.json or *.safetensors in {} (nor PyTorch's \
         pytorch_model.bin or pytorch_model.bin.index.json)",
        dir.display()
    )))
}

fn is_safetensors_file(name: &str) -> bool {
    name.ends_with(".safetensors") && !name.starts_with("adapter_")
}

/// `pytorch_model.bin` or a shard of it; not `training_args.bin` or LLaVA's `non_lora_trainables.bin`, which hold
/// no model weights.
fn is_pytorch_file(name: &str) -> bool {
    name.starts_with("pytorch_model") && name.ends_with(".bin")
}

/// The safetensors and libtorch element types that stic reads.
fn readable_kind(kind: Kind) -> std::result::Result<Kind, String> {
    match kind {
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double | Kind::Int64 => Ok(kind),
        other => Err(format!("{other:?}")),
    }
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

fn safetensors_tensors(path: &Path, mmap: &Mmap, file: usize) -> Result<Vec<(String, StoredTensor)>> {
    let invalid = |why: String| {
        Error::Weights(format!("{} is not a valid safetensors file (truncated or corrupt?): {why}", path.display()))
    };
    let (header_len, metadata) = SafeTensors::read_metadata(mmap).map_err(|e| invalid(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        if data_start + end > mmap.len() {
            return Err(invalid(format!("{name} lies past the end of the file")));
        }
        let dtype = match info.dtype {
            Dtype::F32 => Ok(Kind::Float),
            Dtype::F16 => Ok(Kind::Half),
            Dtype::BF16 => Ok(Kind::BFloat16),
            Dtype::F64 => Ok(Kind::Double),
            Dtype::I64 => Ok(Kind::Int64),
            other => Err(format!("{other:?}")),
        };
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let strides = contiguous_strides(&shape);
        let bytes = data_start + start..data_start + end;
        tensors.push((name.clone(), StoredTensor { file, raw_name: name.clone(), dtype, shape, strides, bytes }));
    }
    Ok(tensors)
}

/// The tensors of a `torch.save` zip archive (torch ≥ 1.6): `<archive>/data.pkl` read by the restricted unpickler,
/// each storage `<archive>/data/<key>` an uncompressed entry whose bytes are used where they lie.
fn pytorch_tensors(path: &Path, mmap: &Mmap, file: usize) -> Result<Vec<(String, StoredTensor)>> {
    let unreadable = |why: String| {
        Error::Weights(format!(
            "{}: {why}; download the file again, or convert the checkpoint to safetensors",
            path.display()
        ))
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&mmap[..])).map_err(|e| {
        unreadable(format!(
            "not a zip archive as torch.save (torch 1.6 or later) writes it, truncated or corrupt? ({e})"
        ))
    })?;
    let mut entries = HashMap::new();
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| unreadable(format!("entry {i} of the zip archive: {e}")))?;
        let start = entry.data_start() as usize;
        let bytes = start..start.saturating_add(entry.compressed_size() as usize);
        entries.insert(entry.name().to_string(), (bytes, entry.compression()));
    }
    let entry = |name: &str| -> Result<Range<usize>> {
        let (bytes, method) = entries.get(name).ok_or_else(|| unreadable(format!("the archive has no {name}")))?;
        if *method != zip::CompressionMethod::Stored {
            return Err(unreadable(format!(
                "{name} is compressed ({method}); torch.save stores every entry uncompressed and stic reads them \
                 in place: save it again with torch.save"
            )));
        }
        if bytes.end > mmap.len() {
            return Err(unreadable(format!("{name} lies past the end of the file (truncated?)")));
        }
        Ok(bytes.clone())
    };
    let pickle_name = entries
        .keys()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .cloned()
        .ok_or_else(|| unreadable("no <archive>/data.pkl in the zip: not a torch.save checkpoint".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl");
    let byteorder = format!("{prefix}byteorder");
    if entries.contains_key(&byteorder) {
        let order = &mmap[entry(&byteorder)?];
        if order != b"little" {
            return Err(unreadable(format!("tensors stored {} endian", String::from_utf8_lossy(order))));
        }
    }
    let records = pickle::read_state_dict(path, &mmap[entry(&pickle_name)?])?;
    let mut tensors = Vec::new();
    for (name, record) in records {
        let storage = entry(&format!("{prefix}data/{}", record.storage))?;
        let dtype = record.dtype.and_then(readable_kind);
        let element = dtype.as_ref().map_or(1, |kind| kind.elt_size_in_bytes());
        let span = if record.shape.contains(&0) {
            Some(0)
        } else {
            record.shape.iter().zip(&record.strides).try_fold(1i64, |span, (&size, &stride)| {
                (stride >= 0).then_some(())?;
                span.checked_add((size - 1).checked_mul(stride)?)
            })
        };
        let bytes = span.and_then(|span| {
            let start = storage.start.checked_add(usize::try_from(record.offset).ok()?.checked_mul(element)?)?;
            let end = start.checked_add(usize::try_from(span).ok()?.checked_mul(element)?)?;
            (end <= storage.end).then_some(start..end)
        });
        let bytes = bytes.ok_or_else(|| {
            unreadable(format!(
                "{name} (shape {:?}, stride {:?}) lies outside its storage",
                record.shape, record.strides
            ))
        })?;
        let tensor =
            StoredTensor { file, raw_name: name.clone(), dtype, shape: record.shape, strides: record.strides, bytes };
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

impl Checkpoint {
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(&weight_files(dir)?)
    }

    /// Opens safetensors files and, by their `.bin` extension, `torch.save` archives.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| {
                Error::Weights(format!("cannot open {} (listed in the checkpoint): {e}", path.display()))
            })?;
            // SAFETY: the mapping is read-only; a file changed by another process while mapped is outside our contract.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let file_idx = files.len();
            let tensors = if path.extension().is_some_and(|x| x == "bin") {
                pytorch_tensors(path, &mmap, file_idx)?
            } else {
                safetensors_tensors(path, &mmap, file_idx)?
            };
            for (name, tensor) in tensors {
                index.insert(canonical_name(&name), tensor);
            }
            files.push(MappedFile { path: path.clone(), mmap });
        }
        Ok(Checkpoint { files, index })
    }

    /// Adds the tensors of the checkpoint in `dir` whose names start with `from`, renamed to start with `to`
    /// instead; the others are left out.
    pub fn add_renamed(&mut self, dir: &Path, from: &str, to: &str) -> Result<()> {
        let other = Checkpoint::open_files(&weight_files(dir)?)?;
        let first_file = self.files.len();
        for (name, mut tensor) in other.index {
            let Some(rest) = name.strip_prefix(from) else { continue };
            tensor.file += first_file;
            // stored under its new name, so that `load_raw` finds it again
            tensor.raw_name = format!("{to}{rest}");
            self.index.insert(tensor.raw_name.clone(), tensor);
        }
        self.files.extend(other.files);
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The stored dtype of a tensor.
    pub fn kind_of(&self, name: &str) -> Option<Kind> {
        match self.index.get(name)?.dtype {
            Ok(kind @ (Kind::BFloat16 | Kind::Half | Kind::Float)) => Some(kind),
            _ => None,
        }
    }

    /// Tensor names as stored in the files.
    pub fn raw_names(&self) -> impl Iterator<Item = &String> {
        self.index.values().map(|t| &t.raw_name)
    }

    /// Loads a tensor by its stored name.
    pub fn load_raw(&self, raw: &str, kind: Kind, device: Device) -> Result<Tensor> {
        self.load(&canonical_name(raw), kind, device)?.ok_or_else(|| Error::Weights(format!("missing tensor {raw}")))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        Some(self.index.get(name)?.shape.clone())
    }

    /// Copies one tensor out of the mapped file, converted to `kind` on `device`.
    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let Some(stored) = self.index.get(name) else { return Ok(None) };
        let file = &self.files[stored.file];
        let stored_kind = stored.dtype.clone().map_err(|other| {
            Error::Weights(format!(
                "{} in {}: dtype {other} is not supported (expected f32, f16 or bf16)",
                stored.raw_name,
                file.path.display()
            ))
        })?;
        let bytes = &file.mmap[stored.bytes.clone()];
        let elements = (bytes.len() / stored_kind.elt_size_in_bytes()) as i64;
        let tensor = Tensor::f_from_data_size(bytes, &[elements], stored_kind)?
            .f_as_strided(&stored.shape, &stored.strides, 0)?
            .f_contiguous()?;
        // The copy is made: give the mapped pages back, or they count in the process's memory beside the copies
        // until the whole checkpoint is unmapped (a 7B model's RSS would reach twice its weights).
        // SAFETY: the mapping is read-only and file-backed, so a page dropped here is read again from the file if
        // anything touches it later; no reference into the range outlives this function.
        unsafe { file.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, stored.bytes.start, stored.bytes.len()) }
            .map_err(|e| Error::io(&file.path, e))?;
        Ok(Some(tensor.f_to_device_(device, kind, false, false)?))
    }
}

enum Backing<'a> {
    Checkpoint(&'a Checkpoint),
    /// Fresh random tensors (for `init-tiny`), remembered so they can be saved.
    Random(RefCell<Vec<(String, Tensor)>>),
    /// Tensors made in memory (`--random-weights`), already of the source's kind and device.
    Tensors(HashMap<String, Tensor>),
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

    pub fn from_tensors(tensors: Vec<(String, Tensor)>, kind: Kind, device: Device) -> Self {
        Self::with_backing(Backing::Tensors(tensors.into_iter().collect()), kind, device)
    }

    fn with_backing(backing: Backing<'a>, kind: Kind, device: Device) -> Self {
        WeightSource {
            backing,
            kind,
            device,
            problems: RefCell::new(Vec::new()),
            requested: RefCell::new(HashSet::new()),
        }
    }

    pub fn root(&self) -> Vb<'_, 'a> {
        Vb { source: self, prefix: String::new() }
    }

    /// The tensors handed out by a random source, by name.
    pub fn into_generated(self) -> Vec<(String, Tensor)> {
        match self.backing {
            Backing::Random(generated) => generated.into_inner(),
            Backing::Checkpoint(_) | Backing::Tensors(_) => Vec::new(),
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
            let mut unknown: Vec<&String> = ckpt
                .index
                .iter()
                .filter(|(name, _)| !requested.contains(*name) && !may_be_unused(name))
                .map(|(_, stored)| &stored.raw_name)
                .collect();
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
        let mut msg = format!(
            "{} problem(s) in the checkpoint{location}:\n  {}",
            problems.len(),
            problems[..problems.len().min(SHOWN)].join("\n  ")
        );
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
            Backing::Tensors(tensors) => tensors.contains_key(name),
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
            Backing::Tensors(tensors) => {
                return match tensors.get(name) {
                    Some(t) if t.size() == shape => t.shallow_clone(),
                    _ => panic!("{name} {shape:?} is not among the tensors made for this model's geometry"),
                };
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
    let is_norm_scale = name.ends_with("norm.weight")
        || name.ends_with("norm1.weight")
        || name.ends_with("norm2.weight")
        || name.ends_with("layrnorm.weight");
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
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
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
    use super::*;
    use std::io::Write;

    /// A torch.save archive in a model folder: the pickle of `model::pickle`'s tests over one f16 storage of 6.
    fn write_torch_archive(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("pytorch_model.bin");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let stored = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in entries {
            zip.start_file(format!("pytorch_model/{name}"), stored).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    fn f16_storage() -> Vec<u8> {
        (0..6).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn pytorch_archives_give_strided_views_of_their_storages() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = crate::model::pickle::tests::torch_state_dict();
        let storage = f16_storage();
        write_torch_archive(dir.path(), &[("data.pkl", &pickle), ("byteorder", b"little"), ("data/0", &storage)]);
        let ckpt = Checkpoint::open_dir(dir.path()).unwrap();
        assert_eq!(ckpt.kind_of("w"), Some(Kind::Half));
        assert_eq!(ckpt.shape("tied"), Some(vec![2, 2]));
        for name in ["w", "tied"] {
            let t = ckpt.load(name, Kind::Float, Device::Cpu).unwrap().unwrap();
            // offset 2, strides (1, 2): [[2, 4], [3, 5]]
            assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), [2.0, 4.0, 3.0, 5.0], "{name}");
        }
    }

    #[test]
    fn broken_pytorch_archives_say_which_file_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = crate::model::pickle::tests::torch_state_dict();
        let short_storage = &f16_storage()[..8];
        let path = write_torch_archive(dir.path(), &[("data.pkl", &pickle), ("data/0", short_storage)]);
        let message = Checkpoint::open_dir(dir.path()).err().unwrap().to_string();
        assert!(
            message.contains("pytorch_model.bin: w (shape [2, 2], stride [1, 2]) lies outside its storage"),
            "{message}"
        );

        write_torch_archive(dir.path(), &[("data.pkl", &pickle), ("data/0", &f16_storage())]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let message = Checkpoint::open_dir(dir.path()).err().unwrap().to_string();
        assert!(message.contains(&format!("{}: not a zip archive", path.display())), "{message}");
        assert!(message.contains("download the file again"), "{message}");
    }

    #[test]
    fn an_index_naming_a_missing_shard_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let index = r#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}"#;
        std::fs::write(dir.path().join("pytorch_model.bin.index.json"), index).unwrap();
        let message = Checkpoint::open_dir(dir.path()).err().unwrap().to_string();
        assert!(message.contains("names the shard"), "{message}");
        assert!(message.contains("pytorch_model-00001-of-00002.bin, which is not there"), "{message}");
    }

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
            (
                "vision_tower.embeddings.patch_embedding.weight",
                "vision_tower.vision_model.embeddings.patch_embedding.weight",
            ),
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
