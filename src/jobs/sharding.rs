//! How a generation command (`prefs`, `describe`, `eval`) splits its input list: the whole list, one
//! `--shard I/N` given by hand, or, under torchrun, shard RANK/WORLD_SIZE on every rank, after which rank 0
//! joins the ranks' files into the output an unsharded run writes.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tch::Device;

use super::shard::{merge_shards, shard_path, MissingKeys, Shard};
use crate::dist::{DistEnv, ProcessGroup};
use crate::error::{Error, Result};
use crate::generate::session::{ModelSpec, Session};

/// This process's share of a job.
pub struct Sharding {
    shard: Shard,
    group: Option<ProcessGroup>,
}

/// An output of the job, for rank 0 to join from the ranks' shard files.
pub struct JobOutput<'a> {
    /// The output an unsharded run writes; rank r writes `shard_path(path, r/n)`.
    pub path: &'a Path,
    pub key_field: &'a str,
    /// The keys of the job's input list, in its order (a repeated key counts at its first position).
    pub keys: &'a [String],
}

impl Sharding {
    /// `spec` is the `--shard` flag, if given. Under torchrun (`WORLD_SIZE` > 1) this joins the process group
    /// and takes shard RANK/WORLD_SIZE; a `--shard` flag there is an error.
    pub fn new(spec: Option<&str>) -> Result<Sharding> {
        match (DistEnv::from_env()?, spec) {
            (Some(env), Some(spec)) => Err(Error::Input(format!(
                "--shard {spec} under torchrun (WORLD_SIZE={}): each rank takes its shard RANK/WORLD_SIZE by itself and \
                 rank 0 joins them; drop --shard, or run without torchrun to process one shard",
                env.world_size
            ))),
            (Some(env), None) => {
                let group = ProcessGroup::init(&env)?;
                Ok(Sharding { shard: Shard::new(group.rank(), group.world_size())?, group: Some(group) })
            }
            (None, spec) => Ok(Sharding { shard: spec.map_or(Ok(Shard::default()), str::parse)?, group: None }),
        }
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The device to run on: under torchrun, `cuda` means this rank's GPU (`cuda:LOCAL_RANK`).
    pub fn device(&self, device: Device) -> Device {
        self.group.as_ref().map_or(device, |g| g.device_for(device))
    }

    /// Loads the model onto the device of this process's share of the job (its own GPU under torchrun).
    pub fn load(&self, spec: &ModelSpec) -> Result<Session> {
        spec.load_on(self.device(spec.device()?))
    }

    /// Whether this process reports progress: every process but the ranks other than 0.
    pub fn is_main(&self) -> bool {
        self.group.as_ref().is_none_or(ProcessGroup::is_main)
    }

    /// The file this process writes for the job's output `path`: under torchrun its rank's shard file, which
    /// the end joins into `path`; otherwise `path` (with `--shard`, the caller names the shard's file).
    pub fn part(&self, path: &Path) -> PathBuf {
        if self.group.is_some() {
            shard_path(path, self.shard)
        } else {
            path.to_owned()
        }
    }

    /// Ends this process's part of the job. Under torchrun: waits until every rank has written its shard files,
    /// leaves the group, and on rank 0 joins the ranks' files of each of `outputs` into its `path`, in input
    /// order and byte for byte as an unsharded run writes it (the shard files stay: a rerun resumes from them).
    /// Returns whether the outputs are complete here: true for rank 0 and for a run over the whole list.
    pub fn finish(self, outputs: &[JobOutput]) -> Result<bool> {
        let Some(group) = self.group else { return Ok(self.shard.count() == 1) };
        let main = group.is_main();
        group.finish()?;
        if main {
            let count = self.shard.count();
            for output in outputs {
                let parts: Vec<PathBuf> = (0..count)
                    .map(|i| Shard::new(i, count).map(|s| shard_path(output.path, s)))
                    .collect::<Result<_, _>>()?;
                let mut seen = HashSet::new();
                let order: Vec<String> = output.keys.iter().filter(|k| seen.insert(k.as_str())).cloned().collect();
                // The ranks finished, so a key no shard holds was skipped or lies beyond --limit, as in one process.
                let n = merge_shards(&parts, output.path, output.key_field, &order, MissingKeys::Omit)?;
                eprintln!("{}: {n} records joined from {count} ranks", output.path.display());
            }
        }
        Ok(main)
    }
}
