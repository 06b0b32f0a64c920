//! `stic image-distribution`: the paper's Fig. 7 (and Table 7's image sets): the CLIP features of image sets (the
//! stage-1 images against each benchmark's) embedded in two dimensions by t-SNE and drawn one colour per set.
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

use super::benchmarks::{self, ImageSource, LoadOptions};
use super::tsne;
use crate::error::{Error, Result};
use crate::fsutil::{check_output, read_json, read_text, write_dir_atomic};
use crate::generate::session::{parse_device, parse_dtype};
use crate::image::{preprocess, AspectMode};
use crate::method::prefs::image_list;
use crate::method::sample::seeded_sample;
use crate::model::clip::ClipVisionModel;
use crate::progress::Progress;

pub const PLOT_FILE: &str = "image_distribution.png";
const PLOT_SIZE: (u32, u32) = (900, 800);
/// matplotlib's `tab10`, the colours of the paper's plot.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A `--set NAME=PATH`: an image folder, or a list of image names (a JSON list, or one name a line).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub name: String,
    pub path: PathBuf,
}

/// `NAME=PATH` with both parts present (the name trimmed), as `--set` and `--benchmark-set` take it.
fn name_and_path(text: &str) -> Option<(String, PathBuf)> {
    let (name, path) = text.split_once('=')?;
    (!name.trim().is_empty() && !path.is_empty()).then(|| (name.trim().to_string(), PathBuf::from(path)))
}

impl std::str::FromStr for ImageSet {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match name_and_path(text) {
            Some((name, path)) => Ok(ImageSet { name, path }),
            None => Err(format!(
                "'{text}' is not NAME=PATH (a set's name, '=', then an image folder or an image list), e.g. \
                 stage1=coco_6k.json"
            )),
        }
    }
}

/// A `--benchmark-set NAME=DATA_DIR`: the distinct images of a benchmark's items, as `stic eval --data DATA_DIR`
/// loads them.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkSet {
    pub benchmark: String,
    pub data: PathBuf,
}

impl std::str::FromStr for BenchmarkSet {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match name_and_path(text) {
            Some((benchmark, data)) => Ok(BenchmarkSet { benchmark, data }),
            None => Err(format!(
                "'{text}' is not NAME=DATA_DIR (a benchmark's name, '=', then the folder `stic eval --data` \
                 takes), e.g. mmbench=playground/data/eval/mmbench"
            )),
        }
    }
}

pub struct ImageDistributionOptions {
    /// Any model folder stic loads: only its vision tower runs.
    pub model: PathBuf,
    pub sets: Vec<ImageSet>,
    pub benchmark_sets: Vec<BenchmarkSet>,
    /// Where the names of the image lists are (default: each list's own folder).
    pub image_dir: Option<PathBuf>,
    pub per_set: usize,
    pub seed: u64,
    pub perplexity: f64,
    /// sklearn's `max_iter`: the most gradient steps.
    pub max_iterations: usize,
    pub batch_size: usize,
    pub dtype: String,
    pub device: String,
    pub output: PathBuf,
}

/// One image of a set: what `embedding.csv` calls it (its name in the set's folder, its path in a benchmark's
/// data, or the id of the benchmark item that embeds it) and where its bytes are.
struct SetImage {
    label: String,
    source: ImageSource,
}

/// The images of one set as drawn.
struct DrawnSet {
    name: String,
    /// The `--set` path or the benchmark's data folder.
    path: PathBuf,
    images: Vec<SetImage>,
    /// How many images the set had before the draw.
    pool: usize,
}

#[derive(serde::Serialize)]
pub struct SetSummary {
    pub name: String,
    pub path: PathBuf,
    pub images: usize,
    pub pool: usize,
}

/// `summary.json`.
#[derive(serde::Serialize)]
pub struct ImageDistributionSummary {
    pub sets: Vec<SetSummary>,
    pub perplexity: f64,
    pub seed: u64,
    pub learning_rate: f64,
    pub kl_divergence: f64,
    pub iterations: usize,
    pub feature_seconds: f64,
    pub tsne_seconds: f64,
}

/// Names in a list file: a JSON list of strings (`.json`), else one name a line.
fn listed_names(list: &Path) -> Result<Vec<String>> {
    if list.extension().is_some_and(|x| x.eq_ignore_ascii_case("json")) {
        return read_json(list);
    }
    Ok(read_text(list)?.lines().map(str::trim).filter(|line| !line.is_empty()).map(String::from).collect())
}

/// The images of a set: every image of a folder, or those a list names (each checked to be in the folder).
fn set_pool(set: &ImageSet, image_dir: Option<&Path>) -> Result<Vec<SetImage>> {
    let in_folder = |folder: &Path, names: Vec<String>| {
        let image = |label: String| SetImage { source: ImageSource::Path(folder.join(&label)), label };
        names.into_iter().map(image).collect()
    };
    let refuse = |why: String| Err(Error::Input(format!("--set {}: {why}", set.name)));
    if set.path.is_dir() {
        return image_list(&set.path, None).map(|names| in_folder(&set.path, names)).or_else(|e| refuse(e.to_string()));
    }
    if !set.path.is_file() {
        return refuse(format!("{} is neither an image folder nor an image list", set.path.display()));
    }
    let folder = image_dir.map_or_else(|| set.path.parent().unwrap_or(Path::new(".")).to_path_buf(), Path::to_path_buf);
    if !folder.is_dir() {
        return refuse(format!(
            "the image folder {} of the list {} does not exist",
            folder.display(),
            set.path.display()
        ));
    }
    let names = listed_names(&set.path)?;
    if names.is_empty() {
        return refuse(format!("the image list {} names no images", set.path.display()));
    }
    let missing: Vec<&String> = names.iter().filter(|name| !folder.join(name).is_file()).collect();
    if let Some(first) = missing.first() {
        let shown: Vec<&str> = missing.iter().take(5).map(|name| name.as_str()).collect();
        return refuse(format!(
            "{} of the {} images listed in {} are not in {} ({}{}); give the folder that holds them with \
             --image-dir (first missing: {})",
            missing.len(),
            names.len(),
            set.path.display(),
            folder.display(),
            shown.join(", "),
            if missing.len() > shown.len() { ", …" } else { "" },
            folder.join(first).display()
        ));
    }
    Ok(in_folder(&folder, names))
}

/// The distinct images of a benchmark's items (the same file or the same bytes once), in item order.
fn benchmark_pool(set: &BenchmarkSet) -> Result<Vec<SetImage>> {
    let refuse = |why: String| Error::Input(format!("--benchmark-set {}: {why}", set.benchmark));
    let benchmark = benchmarks::find(&set.benchmark).map_err(|e| refuse(e.to_string()))?;
    let items = benchmark.load(&set.data, &LoadOptions::default()).map_err(|e| refuse(e.to_string()))?;
    let item_count = items.len();
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> =
        items.iter().map(|item| item.image != ImageSource::None && seen.insert(&item.image)).collect();
    let images: Vec<SetImage> = (items.into_iter().zip(first))
        .filter(|(_, first)| *first)
        .map(|(item, _)| {
            let label = match &item.image {
                ImageSource::Path(path) => path.display().to_string(),
                _ => item.id,
            };
            SetImage { label, source: item.image }
        })
        .collect();
    if images.is_empty() {
        return Err(refuse(format!("no item of {} has an image ({item_count} items)", set.data.display())));
    }
    Ok(images)
}

fn draw_sets(opts: &ImageDistributionOptions) -> Result<Vec<DrawnSet>> {
    let named = opts.sets.iter().map(|set| ("--set", &set.name, &set.path));
    let benchmark_named = opts.benchmark_sets.iter().map(|set| ("--benchmark-set", &set.benchmark, &set.data));
    let sets: Vec<(&str, &String, &PathBuf)> = named.chain(benchmark_named).collect();
    for (k, (flag, name, _)) in sets.iter().enumerate() {
        if sets[..k].iter().any(|(_, other, _)| other == name) {
            return Err(Error::Input(format!("{flag} {name} is given twice: give each set its own name")));
        }
    }
    let pools = (opts.sets.iter().map(|set| set_pool(set, opts.image_dir.as_deref())))
        .chain(opts.benchmark_sets.iter().map(benchmark_pool));
    sets.iter()
        .zip(pools)
        .map(|((_, name, path), pool)| {
            let pool = pool?;
            Ok(DrawnSet {
                name: name.to_string(),
                path: path.to_path_buf(),
                pool: pool.len(),
                images: seeded_sample(pool, opts.per_set, opts.seed),
            })
        })
        .collect()
}

/// The pooled CLIP features `[n, d]` (f32, CPU) of every drawn image, set after set, through the CLIP image
/// processor the model's preprocessor config describes (shortest side resized, centre crop).
fn clip_features(opts: &ImageDistributionOptions, sets: &[DrawnSet]) -> Result<Tensor> {
    let device = parse_device(&opts.device)?;
    let (model, mut image_config) = ClipVisionModel::load(&opts.model, parse_dtype(&opts.dtype, device)?, device)?;
    image_config.aspect_mode = AspectMode::CenterCrop;
    let images: Vec<&SetImage> = sets.iter().flat_map(|set| &set.images).collect();
    let mut progress = Progress::new(images.len() as u64, 0, "image", "images", true);
    let mut batches = Vec::new();
    for batch in images.chunks(opts.batch_size) {
        let pixels = batch
            .iter()
            .map(|image| {
                let decoded = image.source.decode(&image.label, image_config.max_pixels)?;
                let decoded = decoded.expect("a set holds no item without an image");
                Ok(preprocess(&decoded, &image_config).pixel_tensor())
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let pooled = tch::no_grad(|| model.pooler_output(&Tensor::cat(&pixels, 0).to_device(device)));
        batches.push(pooled.to_kind(Kind::Float).to_device(tch::Device::Cpu));
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    Ok(Tensor::cat(&batches, 0))
}

/// An f32 matrix as a NumPy `.npy` file (format 1.0, C order).
fn npy_bytes(matrix: &Tensor) -> Vec<u8> {
    let (rows, columns) = matrix.size2().expect("a matrix");
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {columns}), }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let values = Vec::<f32>::try_from(matrix.contiguous().view([-1])).expect("a float tensor converts");
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    bytes
}

fn write_points(path: &Path, header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<()> {
    let mut writer = csv::Writer::from_path(path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let csv_error = |e: csv::Error| Error::Input(format!("{}: {e}", path.display()));
    writer.write_record(header).map_err(csv_error)?;
    for row in rows {
        writer.write_record(&row).map_err(csv_error)?;
    }
    writer.flush().map_err(|e| Error::io(path, e))
}

/// The scatter plot: one colour per set, a legend with each set's count.
fn draw_plot(path: &Path, sets: &[DrawnSet], points: &[[f64; 2]]) -> Result<()> {
    let (width, height) = PLOT_SIZE;
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    let failed = |e: &dyn std::fmt::Display| Error::Input(format!("drawing {}: {e}", path.display()));
    let range = |axis: usize| {
        let (lo, hi) =
            points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p[axis]), hi.max(p[axis])));
        let pad = ((hi - lo) * 0.05).max(1e-9);
        (lo - pad)..(hi + pad)
    };
    {
        let font = crate::plot::font();
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("t-SNE of CLIP image features", (font, 22))
            .margin(16)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(range(0), range(1))
            .map_err(|e| failed(&e))?;
        chart.configure_mesh().label_style((font, 13)).draw().map_err(|e| failed(&e))?;
        let mut start = 0;
        for (index, set) in sets.iter().enumerate() {
            let colour = PALETTE[index % PALETTE.len()];
            let members = &points[start..start + set.images.len()];
            start += set.images.len();
            chart
                .draw_series(members.iter().map(|p| Circle::new((p[0], p[1]), 3, colour.mix(0.7).filled())))
                .map_err(|e| failed(&e))?
                .label(format!("{} ({})", set.name, set.images.len()))
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
        }
        crate::plot::draw_legend(&mut chart, 14).map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }
    crate::plot::save_png(path, width, height, pixels)
}

fn rows<'a>(sets: &'a [DrawnSet], points: &'a [[f64; 2]]) -> impl Iterator<Item = Vec<String>> + 'a {
    let images = sets.iter().flat_map(|set| set.images.iter().map(move |image| (&set.name, &image.label)));
    images.zip(points).map(|((set, label), p)| vec![set.clone(), label.clone(), p[0].to_string(), p[1].to_string()])
}

fn coordinates(points: &Tensor) -> Vec<[f64; 2]> {
    let flat = Vec::<f64>::try_from(points.to_kind(Kind::Double).contiguous().view([-1])).expect("a double tensor");
    flat.chunks(2).map(|p| [p[0], p[1]]).collect()
}

/// Draws each set's images, embeds their CLIP features with t-SNE and writes `features.npy`, `init.csv`,
/// `embedding.csv`, `summary.json` and the plot into `opts.output`.
pub fn image_distribution(opts: &ImageDistributionOptions) -> Result<ImageDistributionSummary> {
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", opts.model.as_path())];
    inputs.extend(opts.sets.iter().map(|set| ("--set", set.path.as_path())));
    inputs.extend(opts.benchmark_sets.iter().map(|set| ("--benchmark-set", set.data.as_path())));
    inputs.extend(opts.image_dir.as_deref().map(|dir| ("--image-dir", dir)));
    check_output("--output", &opts.output, &inputs)?;
    let sets = draw_sets(opts)?;
    let total: usize = sets.iter().map(|set| set.images.len()).sum();
    if opts.perplexity >= total as f64 {
        return Err(Error::Input(format!(
            "--perplexity {} must be less than the number of images ({total}, as scikit-learn's TSNE requires): \
             lower it or draw more images",
            opts.perplexity
        )));
    }
    let started = Instant::now();
    let features = clip_features(opts, &sets)?;
    let feature_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let device = parse_device(&opts.device)?;
    let init = tsne::pca_init(&features.to_device(device)).to_device(tch::Device::Cpu);
    let embedding = tsne::embed(&features, &init, opts.perplexity, opts.max_iterations, device);
    let summary = ImageDistributionSummary {
        sets: sets
            .iter()
            .map(|set| SetSummary {
                name: set.name.clone(),
                path: set.path.clone(),
                images: set.images.len(),
                pool: set.pool,
            })
            .collect(),
        perplexity: opts.perplexity,
        seed: opts.seed,
        learning_rate: embedding.learning_rate,
        kl_divergence: embedding.kl_divergence,
        iterations: embedding.iterations,
        feature_seconds,
        tsne_seconds: started.elapsed().as_secs_f64(),
    };
    let points = coordinates(&embedding.points);
    write_dir_atomic(&opts.output, |dir| {
        crate::fsutil::write_atomic(&dir.join("features.npy"), &npy_bytes(&features))?;
        write_points(&dir.join("init.csv"), &["set", "image", "x", "y"], rows(&sets, &coordinates(&init)))?;
        write_points(&dir.join("embedding.csv"), &["set", "image", "x", "y"], rows(&sets, &points))?;
        let json = serde_json::to_string_pretty(&summary).expect("the summary serialises");
        crate::fsutil::write_atomic(&dir.join("summary.json"), json.as_bytes())?;
        draw_plot(&dir.join(PLOT_FILE), &sets, &points)
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_a_name_and_a_path() {
        let set: ImageSet = "stage1=lists/coco 6k.json".parse().unwrap();
        assert_eq!(set, ImageSet { name: "stage1".into(), path: PathBuf::from("lists/coco 6k.json") });
        for bad in ["stage1", "=images", "stage1="] {
            assert!(bad.parse::<ImageSet>().unwrap_err().contains("NAME=PATH"), "{bad}");
        }
    }

    #[test]
    fn a_benchmark_set_is_a_name_and_a_data_folder() {
        let set: BenchmarkSet = "mmbench=eval/mm bench".parse().unwrap();
        assert_eq!(set, BenchmarkSet { benchmark: "mmbench".into(), data: PathBuf::from("eval/mm bench") });
        for bad in ["mmbench", "=eval", "mmbench="] {
            assert!(bad.parse::<BenchmarkSet>().unwrap_err().contains("NAME=DATA_DIR"), "{bad}");
        }
    }

    #[test]
    fn npy_headers_are_padded_to_64_bytes() {
        let bytes = npy_bytes(&Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]));
        let header_length = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_length) % 64, 0);
        assert_eq!(bytes.len(), 10 + header_length + 6 * 4);
        assert_eq!(&bytes[10 + header_length..10 + header_length + 4], &1.0f32.to_le_bytes());
    }
}
