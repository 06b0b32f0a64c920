//! The `--help` of `train-dpo` and `train-sft` says what each flag that overrides the YAML config defaults to,
//! read from the shipped config the command starts from, and that of `prefs` and `describe` the sampling
//! defaults of the shipped prompts file, so that help and files cannot drift apart.
use clap::Command;
use stic::train::config::{TrainConfig, STAGE1_DEFAULTS, STAGE2_DEFAULTS};

/// The training commands and the shipped config each starts from (its path, for the help, and its text).
const SHIPPED: [(&str, &str, &str); 2] = [
    ("train-dpo", "configs/paper/stage1.yaml", STAGE1_DEFAULTS),
    ("train-sft", "configs/paper/stage2.yaml", STAGE2_DEFAULTS),
];

const PROMPTS: &str = "third_party/stic/prompts.json";

/// `cli` with the config defaults written into the help of the training and generation jobs' flags.
pub fn with_config_defaults(cli: Command) -> Command {
    let cli = SHIPPED.iter().fold(cli, |cli, &(name, path, text)| {
        let cfg = TrainConfig::shipped(text);
        let values = serde_json::to_value(&cfg).expect("the config serialises");
        cli.mut_subcommand(name, |command| document(command, path, &values))
    });
    let sampling =
        serde_json::to_value(stic::method::prefs::SticPrompts::shipped().generation).expect("the prompts serialise");
    ["prefs", "describe"]
        .iter()
        .fold(cli, |cli, name| cli.mut_subcommand(name, |command| document(command, PROMPTS, &sampling)))
}

fn document(command: Command, path: &str, values: &serde_json::Value) -> Command {
    command.mut_args(|arg| {
        let Some(value) = config_value(values, arg.get_id().as_str()).filter(|v| !v.is_null()) else { return arg };
        let shown = value.as_str().map_or_else(|| value.to_string(), str::to_string);
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        arg.help(format!("{help} [default: {shown} from {path}]"))
    })
}

/// The config value a flag overrides: the key of its name (`lr`), the `lora:` key after a `lora_` prefix
/// (`lora_r`), or the objective's key under `dpo:` (`beta`).
fn config_value<'a>(values: &'a serde_json::Value, flag: &str) -> Option<&'a serde_json::Value> {
    values
        .get(flag)
        .or_else(|| flag.strip_prefix("lora_").and_then(|key| values["lora"].get(key)))
        .or_else(|| values["dpo"].get(flag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_texts_are_the_named_files() {
        let prompts = serde_json::to_string(&stic::method::prefs::SticPrompts::shipped()).unwrap();
        let file: stic::method::prefs::SticPrompts =
            stic::fsutil::read_json(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PROMPTS)).unwrap();
        assert_eq!(serde_json::to_string(&file).unwrap(), prompts);
        for (_, path, text) in SHIPPED {
            let file = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
            assert_eq!(file, text, "{path}");
        }
    }

    #[test]
    fn every_config_flag_shows_the_config_value() {
        let cli = with_config_defaults(<crate::Cli as clap::CommandFactory>::command());
        let help = |sub: &str, flag: &str| {
            let command = cli.find_subcommand(sub).unwrap();
            let arg = command.get_arguments().find(|a| a.get_id() == flag).unwrap_or_else(|| panic!("{sub} --{flag}"));
            arg.get_help().unwrap().to_string()
        };
        assert!(help("train-dpo", "lr").ends_with("[default: 1e-7 from configs/paper/stage1.yaml]"));
        assert!(
            help("train-sft", "lr").ends_with("[default: 0.00002 from configs/paper/stage2.yaml]"),
            "{}",
            help("train-sft", "lr")
        );
        assert!(help("train-dpo", "alpha").ends_with("[default: 0.0009765625 from configs/paper/stage1.yaml]"));
        assert!(help("train-dpo", "lora_alpha").ends_with("[default: 256.0 from configs/paper/stage1.yaml]"));
        assert!(help("train-dpo", "loss_type").contains("[default: sigmoid from"));
        assert!(help("prefs", "max_new_tokens").ends_with("[default: 1024 from third_party/stic/prompts.json]"));
        assert!(help("describe", "temperature").ends_with("[default: 0.2 from third_party/stic/prompts.json]"));
        for flag in [
            "lr",
            "projector_lr",
            "epochs",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "batch_size",
            "grad_accum",
            "max_length",
            "save_steps",
            "seed",
            "device",
            "dtype",
            "gradient_checkpointing",
        ] {
            assert!(help("train-sft", flag).contains("from configs/paper/stage2.yaml]"), "{flag}");
        }
    }
}
