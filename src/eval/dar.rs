//! Describe-and-respond, the description pass: one description per distinct (model, adapter, image, description
//! prompt, template, token limit, dtype), reused by every question on that image (and every MMBench rotation of
//! it) and by later runs into the same output folder, which resume `descriptions.jsonl` by that key. Or the
//! descriptions of a file made beforehand, as the paper's DaR on the benchmarks other than MMBench read them.
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::path::Path;

use super::item::{EvalItem, ImageSource};
use super::provenance::sha256_hex;
use super::python;
use super::run::item_image;
use crate::error::{Error, Result};
use crate::jobs::job::{GenerationTask, Request};
use crate::jobs::jsonl::read_jsonl;
use crate::jobs::shard::{shard_path, Shard};

/// Everything a description depends on besides the image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DescriptionSetup {
    /// [`folder_fingerprint`](super::provenance::folder_fingerprint) of the model and the adapter.
    pub model: String,
    pub adapter: Option<String>,
    pub prompt: String,
    pub template: &'static str,
    pub max_new_tokens: usize,
    pub dtype: String,
    /// Describe without the image, as the official `model_vqa_mmbench_dar.py` does (its description prompt has
    /// no `<image>`): then every item shares one description.
    pub image_blind: bool,
}

/// The description an item needs.
#[derive(Clone)]
pub struct DescriptionRequest<'a> {
    /// The item's position in the benchmark's list.
    pub position: usize,
    pub item: &'a EvalItem,
    pub key: String,
    /// sha256 of the image file; `None` when the description is written without the image.
    pub image_sha256: Option<String>,
}

impl DescriptionSetup {
    /// The requests of `items`: every item with an image, and with `image_blind` every item. Items whose image
    /// file cannot be read get a key of their own; describing them reports the error.
    pub fn requests<'a>(&self, items: &'a [EvalItem]) -> Vec<DescriptionRequest<'a>> {
        let setup = serde_json::to_string(self).expect("the setup serialises");
        items
            .iter()
            .enumerate()
            .filter_map(|(position, item)| {
                let image = if self.image_blind {
                    None
                } else {
                    Some(match &item.image {
                        ImageSource::Path(path) => std::fs::read(path)
                            .map_or_else(|_| format!("unreadable {}", path.display()), |bytes| sha256_hex(&bytes)),
                        ImageSource::Bytes(bytes) => sha256_hex(bytes),
                        ImageSource::None => return None,
                    })
                };
                let key = sha256_hex(format!("{setup}\n{}", image.as_deref().unwrap_or("no image")).as_bytes());
                Some(DescriptionRequest { position, item, key, image_sha256: image })
            })
            .collect()
    }
}

/// DaR's first pass over the requests.
pub struct DescribeItems<'a> {
    prompt: String,
    max_pixels: u64,
    requests: PhantomData<DescriptionRequest<'a>>,
}

impl DescribeItems<'_> {
    pub fn new(prompt: String, max_pixels: u64) -> Self {
        DescribeItems { prompt, max_pixels, requests: PhantomData }
    }
}

impl<'a> GenerationTask for DescribeItems<'a> {
    type Item = DescriptionRequest<'a>;
    type Plan = ();

    fn key(&self, request: &DescriptionRequest) -> String {
        request.key.clone()
    }

    fn plan(&self, _position: usize, request: &DescriptionRequest) -> std::result::Result<((), Vec<Request>), String> {
        let image = match request.image_sha256 {
            Some(_) => Some(item_image(request.item, self.max_pixels)?.ok_or("the item has no image to describe")?),
            None => None,
        };
        Ok(((), vec![Request { user_text: self.prompt.clone(), image }]))
    }

    fn record(
        &self,
        _position: usize,
        request: &DescriptionRequest,
        _plan: (),
        outputs: Vec<String>,
    ) -> serde_json::Value {
        serde_json::json!({"key": request.key, "image_sha256": request.image_sha256, "description": python::strip(&outputs[0])})
    }
}

pub const KEY_FIELD: &str = "key";

/// The descriptions of `path` by key.
pub fn read_descriptions(path: &Path) -> Result<HashMap<String, String>> {
    let rows: Vec<serde_json::Value> = read_jsonl(path)?;
    Ok(rows
        .iter()
        .filter_map(|row| Some((row[KEY_FIELD].as_str()?.to_string(), row["description"].as_str()?.to_string())))
        .collect())
}

/// Each item's description by item id, for the items whose description is in `descriptions`.
pub fn by_item(requests: &[DescriptionRequest], descriptions: &HashMap<String, String>) -> HashMap<String, String> {
    requests.iter().filter_map(|r| Some((r.item.id.clone(), descriptions.get(&r.key)?.clone()))).collect()
}

/// Joins the `count` ranks' description files into `path`, each key once, in the order of `requests` (as one
/// process writes it). Ranks whose items share an image both describe it; the first rank's record is kept.
pub fn join_rank_files(path: &Path, count: usize, requests: &[DescriptionRequest]) -> Result<usize> {
    let mut records: HashMap<String, serde_json::Value> = HashMap::new();
    for index in 0..count {
        let part = shard_path(path, Shard::new(index, count)?);
        for row in read_jsonl::<serde_json::Value>(&part)? {
            let key = row[KEY_FIELD]
                .as_str()
                .ok_or_else(|| Error::Input(format!("{}: a record without \"{KEY_FIELD}\"", part.display())))?
                .to_string();
            records.entry(key).or_insert(row);
        }
    }
    let mut seen = HashSet::new();
    let mut text = String::new();
    for request in requests {
        if let (true, Some(record)) = (seen.insert(request.key.as_str()), records.get(&request.key)) {
            text.push_str(&serde_json::to_string(record).expect("a parsed record serialises"));
            text.push('\n');
        }
    }
    crate::fsutil::write_atomic(path, text.as_bytes())?;
    Ok(text.lines().count())
}

/// The descriptions of a `--descriptions` file, as the commented-out DaR of the official `model_vqa_science.py` and
/// `model_vqa.py` reads them: JSONL of `{image, description}` (what `stic describe` writes), looked up by the
/// question's image path. The official key is the image folder joined with the file name; here a record's image
/// matches the question whose image path ends with the longest part of it that names one image.
pub struct DescriptionFile {
    pub sha256: String,
    /// Each item's description by item id.
    pub by_item: HashMap<String, String>,
}

fn path_parts(path: &Path) -> Vec<String> {
    path.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// Each trailing part of each path (joined with `/`), with the path and its value; a part that two paths share is
/// `None`.
fn by_suffix<'a, T: Clone + 'a>(
    paths: impl Iterator<Item = (Vec<String>, T)>,
) -> HashMap<String, Option<(Vec<String>, T)>> {
    let mut index: HashMap<String, Option<(Vec<String>, T)>> = HashMap::new();
    for (parts, value) in paths {
        for start in 0..parts.len() {
            let entry = index.entry(parts[start..].join("/")).or_insert_with(|| Some((parts.clone(), value.clone())));
            if entry.as_ref().is_some_and(|(other, _)| *other != parts) {
                *entry = None;
            }
        }
    }
    index
}

/// Reads `path` and finds a description for every item of `items` with an image.
pub fn read_description_file(path: &Path, items: &[EvalItem]) -> Result<DescriptionFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes.clone())
        .map_err(|e| Error::Input(format!("{}: not UTF-8 text ({e})", path.display())))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), index + 1);
        let row: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::Input(format!("{at}: not a JSON record ({e})")))?;
        let field = |name: &str| {
            row[name].as_str().map(str::to_string).ok_or_else(|| {
                Error::Input(format!(
                    "{at}: a record without a string \"{name}\" (each line is {{\"image\": …, \"description\": …}}, as \
                     `stic describe` writes)"
                ))
            })
        };
        records.push((field("image")?, field("description")?));
    }
    let record_suffixes =
        by_suffix(records.iter().map(|(image, description)| (path_parts(Path::new(image)), description)));
    let item_parts: Vec<Vec<String>> = items
        .iter()
        .map(|item| match &item.image {
            ImageSource::Path(image) => path_parts(image),
            _ => Vec::new(),
        })
        .collect();
    let item_suffixes = by_suffix(item_parts.iter().map(|parts| (parts.clone(), ())));
    let mut by_item = HashMap::new();
    let mut missing = Vec::new();
    for (item, parts) in items.iter().zip(&item_parts) {
        if matches!(item.image, ImageSource::None) {
            continue;
        }
        // The longest trailing part of the image path that names this image alone, among the records and the items.
        let found = (0..parts.len()).find_map(|start| {
            let suffix = parts[start..].join("/");
            let names_this_item = matches!(item_suffixes.get(&suffix), Some(Some(_)));
            let (_, description) = record_suffixes.get(&suffix)?.as_ref()?;
            names_this_item.then(|| description.to_string())
        });
        match found {
            Some(description) => {
                by_item.insert(item.id.clone(), description);
            }
            None => missing.push(item),
        }
    }
    if !missing.is_empty() {
        let first: Vec<String> = missing
            .iter()
            .take(5)
            .map(|item| match &item.image {
                ImageSource::Path(image) => format!("{} ({})", item.id, image.display()),
                _ => format!("{} (an image embedded in the data, without a file name)", item.id),
            })
            .collect();
        return Err(Error::Input(format!(
            "{}: no description for {} of the {} questions with an image (first: {}); make the file for these \
             images with `stic describe`",
            path.display(),
            missing.len(),
            missing.len() + by_item.len(),
            first.join(", ")
        )));
    }
    Ok(DescriptionFile { sha256: sha256_hex(&bytes), by_item })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn item(id: &str, image: ImageSource) -> EvalItem {
        EvalItem { id: id.to_string(), image, question: "q".to_string(), meta: serde_json::Value::Null }
    }

    fn setup(image_blind: bool) -> DescriptionSetup {
        DescriptionSetup {
            model: "m".to_string(),
            adapter: None,
            prompt: "Describe.".to_string(),
            template: "vicuna_v1",
            max_new_tokens: 8,
            dtype: "f32".to_string(),
            image_blind,
        }
    }

    #[test]
    fn one_key_per_image_and_setup() {
        let items = [
            item("0", ImageSource::Bytes(vec![1, 2])),
            item("1000000", ImageSource::Bytes(vec![1, 2])),
            item("1", ImageSource::Bytes(vec![3])),
            item("text", ImageSource::None),
        ];
        let requests = setup(false).requests(&items);
        assert_eq!(requests.iter().map(|r| r.item.id.as_str()).collect::<Vec<_>>(), ["0", "1000000", "1"]);
        assert_eq!(requests[0].key, requests[1].key, "the same image bytes share a description");
        assert_ne!(requests[0].key, requests[2].key);
        assert_eq!(requests[2].image_sha256.as_deref(), Some(sha256_hex(&[3]).as_str()));

        let other_template = DescriptionSetup { template: "mistral_instruct", ..setup(false) };
        assert_ne!(other_template.requests(&items)[0].key, requests[0].key);
        let other_adapter = DescriptionSetup { adapter: Some("a".to_string()), ..setup(false) };
        assert_ne!(other_adapter.requests(&items)[0].key, requests[0].key);

        // Written without the image: one description for every item, text-only ones included.
        let blind = setup(true).requests(&items);
        assert_eq!(blind.len(), 4);
        assert!(blind.iter().all(|r| r.key == blind[0].key && r.image_sha256.is_none()));
    }

    #[test]
    fn rank_files_join_each_key_once_in_request_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("descriptions.jsonl");
        let items = [
            item("a", ImageSource::Bytes(vec![1])),
            item("b", ImageSource::Bytes(vec![1])),
            item("c", ImageSource::Bytes(vec![2])),
        ];
        let requests = setup(false).requests(&items);
        let line = |r: &DescriptionRequest, d: &str| format!("{{\"key\":\"{}\",\"description\":\"{d}\"}}\n", r.key);
        // rank 0 owns a and c, rank 1 owns b: both describe the shared image
        std::fs::write(
            shard_path(&path, Shard::new(0, 2).unwrap()),
            line(&requests[2], "two") + &line(&requests[0], "one"),
        )
        .unwrap();
        std::fs::write(shard_path(&path, Shard::new(1, 2).unwrap()), line(&requests[1], "one")).unwrap();
        assert_eq!(join_rank_files(&path, 2, &requests).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line(&requests[0], "one") + &line(&requests[2], "two"));
        let by_id = by_item(&requests, &read_descriptions(&path).unwrap());
        assert_eq!((by_id["a"].as_str(), by_id["b"].as_str(), by_id["c"].as_str()), ("one", "one", "two"));
    }

    #[test]
    fn description_file_matches_the_longest_trailing_part_of_the_image_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"image\":\"playground/data/eval/scienceqa/images/test/4/image.png\",\"description\":\"four\"}\n",
                "\n",
                "{\"image\":\"./playground/data/eval/scienceqa/images/test/7/image.png\",\"description\":\"seven\"}\n",
            ),
        )
        .unwrap();
        let path_item = |id: &str, p: &str| item(id, ImageSource::Path(PathBuf::from(p)));
        let items = [
            path_item("4", "/data/sqa/images/test/4/image.png"),
            path_item("7", "/data/sqa/images/test/7/image.png"),
            item("5", ImageSource::None),
        ];
        let file = read_description_file(&path, &items).unwrap();
        assert_eq!((file.by_item["4"].as_str(), file.by_item["7"].as_str()), ("four", "seven"));
        assert_eq!(file.sha256, sha256_hex(&std::fs::read(&path).unwrap()));

        // "image.png" alone names two images: it matches neither
        let err =
            read_description_file(&path, &[path_item("9", "/elsewhere/image.png"), path_item("12", "12/image.png")])
                .err()
                .unwrap()
                .to_string();
        assert!(
            err.contains("no description for 2 of the 2 questions") && err.contains("9 (/elsewhere/image.png)"),
            "{err}"
        );

        // a file with image 7 alone does not answer for image 4, though "image.png" is then one record's
        std::fs::write(&path, "{\"image\":\"images/test/7/image.png\",\"description\":\"seven\"}\n").unwrap();
        let err = read_description_file(&path, &items).err().unwrap().to_string();
        assert!(err.contains("no description for 1 of the 2 questions") && err.contains("first: 4 ("), "{err}");

        std::fs::write(&path, "{\"image\":\"a.png\",\"description\":\"x\"}\n{\"image\":\"b.png\"}\n").unwrap();
        let err = read_description_file(&path, &items).err().unwrap().to_string();
        assert!(err.contains("d.jsonl:2: a record without a string \"description\""), "{err}");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(read_description_file(&path, &items)
            .err()
            .unwrap()
            .to_string()
            .contains("d.jsonl:1: not a JSON record"));
    }
}
