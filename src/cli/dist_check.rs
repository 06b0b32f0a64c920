//! `stic dist-check`: a diagnostics run of the distributed layer under torchrun.
use stic::dist::{backend_for, rank_and_world, ProcessGroup};
use stic::generate::session::parse_device;
use tch::{Device, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Device of the tensors: cpu (gloo), or cuda for this rank's GPU (cuda:LOCAL_RANK; NCCL when built with it).
    #[arg(long, default_value = "cpu", value_parser = super::choices::device)]
    device: String,
    /// This rank stops before the all-reduce and waits (at most 10 minutes) to be killed, so that tests can
    /// check how the other ranks report a lost rank.
    #[arg(long, hide = true)]
    stall_rank: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let group = ProcessGroup::from_env_with(true)?;
    let (rank, world) = rank_and_world(group.as_ref());
    let device = group.as_ref().map_or(device, |g| g.device_for(device));
    if args.stall_rank == Some(rank) {
        eprintln!("rank {rank}: stalling before the all-reduce (--stall-rank)");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
    // Sum of the ranks, and rank 0's number broadcast to all.
    let value = Tensor::from_slice(&[rank as f64]).to_device(device);
    let broadcast = Tensor::from_slice(&[(rank * 10 + 7) as f64]).to_device(device);
    if let Some(g) = &group {
        g.all_reduce_sum(&value)?;
        g.broadcast(&broadcast, 0)?;
        g.barrier()?;
    }
    let line = serde_json::json!({
        "rank": rank,
        "world_size": world,
        "backend": if group.is_some() { backend_for(device) } else { "none" },
        "device": format!("{device:?}"),
        "sum": value.to_device(Device::Cpu).double_value(&[0]),
        "broadcast": broadcast.to_device(Device::Cpu).double_value(&[0]),
    });
    println!("{line}");
    if let Some(g) = group {
        g.finish()?;
    }
    Ok(())
}
