//! Exact t-SNE as scikit-learn 1.7.2's `TSNE(method="exact")` computes it (squared euclidean input distances,
//! two dimensions, Student-t with one degree of freedom, the default schedule), on libtorch tensors in f64 so that
//! the O(n²) steps run on the GPU when there is one.
use tch::{Device, Kind, Tensor};

use crate::progress::Progress;

/// The smallest probability (numpy's `finfo(float64).eps`).
const MACHINE_EPSILON: f64 = f64::EPSILON;
/// sklearn keeps these two constants of its perplexity search in C `float`s.
const PERPLEXITY_TOLERANCE: f32 = 1e-5;
const EMPTY_ROW_SUM: f32 = 1e-8;
const PERPLEXITY_STEPS: usize = 100;
const EARLY_EXAGGERATION: f64 = 12.0;
const EXPLORATION_ITERATIONS: usize = 250;
/// sklearn's default `max_iter`.
pub const DEFAULT_MAX_ITERATIONS: usize = 1000;
const ITERATIONS_WITHOUT_PROGRESS: usize = 300;
const CHECK_EVERY: usize = 50;
const MIN_GAIN: f64 = 0.01;
const MIN_GRAD_NORM: f64 = 1e-7;
/// The standard deviation of the first component of the initial embedding.
const INIT_SCALE: f64 = 1e-4;

/// The result of [`embed`].
pub struct Embedding {
    /// `[n, 2]` f64 on the CPU.
    pub points: Tensor,
    pub kl_divergence: f64,
    /// Gradient steps run (sklearn's `n_iter_ + 1`).
    pub iterations: usize,
    pub learning_rate: f64,
}

/// Squared euclidean distances of the rows of `features` as sklearn computes them for float32 data: in f64
/// (|x|² − 2x·y + |y|², negatives clipped, zero diagonal), then rounded to f32 for the perplexity search.
pub fn squared_distances(features: &Tensor) -> Vec<f32> {
    let x = features.to_kind(Kind::Double);
    let norms = x.square().sum_dim_intlist(1, false, Kind::Double);
    let mut distances = (x.matmul(&x.tr()) * -2.0 + norms.unsqueeze(1) + norms.unsqueeze(0)).clamp_min(0.0);
    let _ = distances.fill_diagonal_(0.0, false);
    Vec::<f32>::try_from(distances.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, 1))
        .expect("a float tensor converts")
}

/// For each point, the conditional probabilities `p_j|i` of a Gaussian whose precision is found by bisection so
/// that the distribution's perplexity is `perplexity` (sklearn's `_binary_search_perplexity`, rows in parallel).
pub fn conditional_probabilities(squared_distances: &[f32], n: usize, perplexity: f64) -> Vec<f64> {
    let target_entropy = f64::from(perplexity as f32).ln();
    let mut probabilities = vec![0.0f64; n * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.max(1));
    let rows_per_thread = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk, rows) in probabilities.chunks_mut(rows_per_thread * n).enumerate() {
            scope.spawn(move || {
                for (offset, row) in rows.chunks_mut(n).enumerate() {
                    let i = chunk * rows_per_thread + offset;
                    fit_row(&squared_distances[i * n..(i + 1) * n], i, target_entropy, row);
                }
            });
        }
    });
    probabilities
}

fn fit_row(distances: &[f32], i: usize, target_entropy: f64, row: &mut [f64]) {
    let (mut beta, mut beta_min, mut beta_max) = (1.0f64, f64::NEG_INFINITY, f64::INFINITY);
    for _ in 0..PERPLEXITY_STEPS {
        let mut sum = 0.0;
        for (j, (p, &d)) in row.iter_mut().zip(distances).enumerate() {
            if j != i {
                *p = (-f64::from(d) * beta).exp();
                sum += *p;
            }
        }
        if sum == 0.0 {
            sum = f64::from(EMPTY_ROW_SUM);
        }
        let mut weighted_distance = 0.0;
        for (p, &d) in row.iter_mut().zip(distances) {
            *p /= sum;
            weighted_distance += f64::from(d) * *p;
        }
        let entropy_excess = sum.ln() + beta * weighted_distance - target_entropy;
        if entropy_excess.abs() <= f64::from(PERPLEXITY_TOLERANCE) {
            break;
        }
        if entropy_excess > 0.0 {
            beta_min = beta;
            beta = if beta_max == f64::INFINITY { beta * 2.0 } else { (beta + beta_max) / 2.0 };
        } else {
            beta_max = beta;
            beta = if beta_min == f64::NEG_INFINITY { beta / 2.0 } else { (beta + beta_min) / 2.0 };
        }
    }
}

/// The joint probabilities `p_ij`: the conditional ones symmetrised and normalised, at least machine epsilon off
/// the diagonal, zero on it; `[n, n]` f64 on `device`.
fn joint_probabilities(conditional: &[f64], n: usize, device: Device) -> Tensor {
    let conditional = Tensor::from_slice(conditional).view([n as i64, n as i64]).to_device(device);
    let symmetric = &conditional + conditional.tr();
    let total = symmetric.sum(Kind::Double).double_value(&[]).max(MACHINE_EPSILON);
    let mut joint = (symmetric / total).clamp_min(MACHINE_EPSILON);
    let _ = joint.fill_diagonal_(0.0, false);
    joint
}

/// sklearn's `init="pca"`: the rows of `features` projected on their first two principal components (each
/// component's sign set so that its largest loading is positive, as sklearn's `svd_flip`), scaled so that the
/// first coordinate has standard deviation 1e-4. `[n, 2]` f64 on the features' device.
pub fn pca_init(features: &Tensor) -> Tensor {
    let x = features.to_kind(Kind::Double);
    let centred = &x - x.mean_dim(0, true, Kind::Double);
    let (_, _, right_vectors) = centred.svd(true, true);
    let components = right_vectors.narrow(1, 0, 2).tr();
    let largest = components.abs().argmax(1, true);
    let signs = components.gather(1, &largest, false).sign();
    let projected = centred.matmul(&(components * signs).tr());
    let spread = projected.select(1, 0).std(false).double_value(&[]);
    projected * (INIT_SCALE / spread)
}

/// The KL divergence of P and the Student-t Q of `points` (when `with_error`) and its gradient, as sklearn's
/// `_kl_divergence`.
fn kl_divergence(joint: &Tensor, points: &Tensor, with_error: bool) -> (f64, Tensor) {
    let pairwise = |column: i64| {
        let coordinate = points.select(1, column);
        (coordinate.unsqueeze(1) - coordinate.unsqueeze(0)).square()
    };
    let mut kernel = (pairwise(0) + pairwise(1) + 1.0).reciprocal();
    let _ = kernel.fill_diagonal_(0.0, false);
    let similarities = (&kernel / kernel.sum(Kind::Double)).clamp_min(MACHINE_EPSILON);
    let error = if with_error {
        (joint * (joint.clamp_min(MACHINE_EPSILON) / &similarities).log()).sum(Kind::Double).double_value(&[])
    } else {
        f64::NAN
    };
    let attraction = (joint - &similarities) * &kernel;
    let gradient = (points * attraction.sum_dim_intlist(1, true, Kind::Double) - attraction.matmul(points)) * 4.0;
    (error, gradient)
}

/// A stage of the schedule: its steps, momentum and how many steps without a better error end it.
struct Stage {
    start: usize,
    end: usize,
    momentum: f64,
    patience: usize,
}

/// One of sklearn's `_gradient_descent` runs: the stage's steps with momentum and per-coordinate gains, stopping
/// early when the error (checked every 50 steps) has not improved for `patience` steps or the gradient vanishes.
/// Returns the points, the last error and the last step run.
fn descend(
    joint: &Tensor,
    mut points: Tensor,
    stage: &Stage,
    learning_rate: f64,
    progress: &mut Progress,
) -> (Tensor, f64, usize) {
    let mut update = points.zeros_like();
    let mut gains = points.ones_like();
    let (mut error, mut best_error) = (f64::MAX, f64::MAX);
    let (mut best_step, mut step) = (stage.start, stage.start);
    for i in stage.start..stage.end {
        step = i;
        let check = (i + 1) % CHECK_EVERY == 0;
        let (new_error, gradient) = kl_divergence(joint, &points, check || i == stage.end - 1);
        error = new_error;
        let same_direction = (&update * &gradient).lt(0.0);
        gains = (&gains + 0.2).where_self(&same_direction, &(&gains * 0.8)).clamp_min(MIN_GAIN);
        let gradient = gradient * &gains;
        update = update * stage.momentum - &gradient * learning_rate;
        points += &update;
        progress.inc(1);
        if check {
            progress.set_message(format!("KL {error:.4}"));
            let gradient_norm = gradient.square().sum(Kind::Double).sqrt().double_value(&[]);
            if error < best_error {
                best_error = error;
                best_step = i;
            } else if i - best_step > stage.patience {
                break;
            }
            if gradient_norm <= MIN_GRAD_NORM {
                break;
            }
        }
    }
    (points, error, step)
}

/// The smallest `max_iter` sklearn accepts: the exploration stage.
pub const MIN_MAX_ITERATIONS: usize = EXPLORATION_ITERATIONS;

/// Embeds the rows of `features` (`[n, d]`) in two dimensions from `init` (`[n, 2]`): sklearn's
/// `TSNE(method="exact", perplexity=perplexity, init=init, max_iter=max_iterations).fit_transform(features)`,
/// learning rate "auto".
pub fn embed(features: &Tensor, init: &Tensor, perplexity: f64, max_iterations: usize, device: Device) -> Embedding {
    let n = features.size()[0] as usize;
    let conditional = conditional_probabilities(&squared_distances(&features.to_device(device)), n, perplexity);
    let joint = joint_probabilities(&conditional, n, device);
    let learning_rate = (n as f64 / EARLY_EXAGGERATION / 4.0).max(50.0);
    let mut progress = Progress::new(max_iterations as u64, 0, "t-SNE step", "steps", true);
    let exploration = Stage { start: 0, end: EXPLORATION_ITERATIONS, momentum: 0.5, patience: EXPLORATION_ITERATIONS };
    // a copy: the steps move the points in place, and `init` is written out afterwards
    let points = init.to_kind(Kind::Double).to_device(device).copy();
    let exaggerated = &joint * EARLY_EXAGGERATION;
    let (points, _, last) = descend(&exaggerated, points, &exploration, learning_rate, &mut progress);
    let refinement =
        Stage { start: last + 1, end: max_iterations, momentum: 0.8, patience: ITERATIONS_WITHOUT_PROGRESS };
    // sklearn divides its exaggerated P back in place: those roundings are part of the P it goes on with, and
    // t-SNE's steps are sensitive enough for them to show in the result.
    let (points, kl_divergence, last) =
        descend(&(exaggerated / EARLY_EXAGGERATION), points, &refinement, learning_rate, &mut progress);
    progress.finish();
    Embedding { points: points.to_device(Device::Cpu), kl_divergence, iterations: last + 1, learning_rate }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The perplexity of each fitted row, 2^H with H in bits, is the one asked for.
    #[test]
    fn each_conditional_distribution_has_the_perplexity_asked_for() {
        let n = 40;
        let points: Vec<f64> = (0..n * 3).map(|k| ((k * 7919) % 101) as f64 / 10.0).collect();
        let features = Tensor::from_slice(&points).view([n as i64, 3]).to_kind(Kind::Float);
        let distances = squared_distances(&features);
        for perplexity in [2.0, 5.0, 30.0] {
            let probabilities = conditional_probabilities(&distances, n, perplexity);
            for (i, row) in probabilities.chunks(n).enumerate() {
                assert_eq!(row[i], 0.0);
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                let entropy: f64 = row.iter().filter(|&&p| p > 0.0).map(|p| -p * p.ln()).sum();
                assert!((entropy.exp() - perplexity).abs() < 1e-3 * perplexity, "row {i}: {}", entropy.exp());
            }
        }
    }

    #[test]
    fn the_pca_init_has_the_scale_of_sklearn() {
        let features = Tensor::randn([30, 5], (Kind::Float, Device::Cpu));
        let init = pca_init(&features);
        assert_eq!(init.size(), [30, 2]);
        assert!((init.select(1, 0).std(false).double_value(&[]) - INIT_SCALE).abs() < 1e-12);
        assert!(init.select(1, 1).std(false).double_value(&[]) <= INIT_SCALE * (1.0 + 1e-9));
    }

    /// The gradient is that of the KL divergence (finite differences), sklearn's factor 4 included.
    #[test]
    fn the_gradient_is_the_derivative_of_the_kl_divergence() {
        let n = 6;
        let weights: Vec<f64> = (0..n * n).map(|k| if k % (n + 1) == 0 { 0.0 } else { 1.0 + (k % 5) as f64 }).collect();
        let joint = Tensor::from_slice(&weights).view([n as i64, n as i64]);
        let joint = (&joint + joint.tr()) / (2.0 * joint.sum(Kind::Double).double_value(&[]));
        let points =
            Tensor::from_slice(&[0.1, -0.3, 0.7, 0.2, -0.5, 0.4, 0.0, 0.9, 0.3, -0.8, -0.2, 0.05]).view([6, 2]);
        let (_, gradient) = kl_divergence(&joint, &points, false);
        let step = 1e-6;
        for k in 0..(2 * n as i64) {
            let nudged = |by: f64| {
                let moved = points.copy();
                let _ = moved.view([-1]).get(k).g_add_scalar_(by);
                kl_divergence(&joint, &moved, true).0
            };
            let numeric = (nudged(step) - nudged(-step)) / (2.0 * step);
            let analytic = gradient.view([-1]).double_value(&[k]);
            assert!((numeric - analytic).abs() < 1e-6, "coordinate {k}: {numeric} vs {analytic}");
        }
    }
}
