//! Value parsers of the flags that take one of a closed set: clap lists the choices in `--help` and refuses any
//! other value (exit 2) with a message that lists them.
use clap::builder::{PossibleValue, PossibleValuesParser, Str, TypedValueParser};
use clap::ValueEnum;

pub fn one_of<S: Into<Str>>(names: impl IntoIterator<Item = S>) -> PossibleValuesParser {
    PossibleValuesParser::new(names.into_iter().map(PossibleValue::new))
}

/// The names of `T`'s values, listed alone (the variants' docs are written for the library, not for `--help`).
pub fn names<T: ValueEnum>() -> PossibleValuesParser {
    one_of(T::value_variants().iter().filter_map(T::to_possible_value).map(|value| value.get_name().to_string()))
}

/// One of `T`'s values, by name.
pub fn value_enum<T: ValueEnum + Clone + Send + Sync + 'static>() -> impl TypedValueParser<Value = T> {
    names::<T>().try_map(|name| T::from_str(&name, false))
}

/// The dtypes `stic::generate::session::parse_dtype` reads, with its long spellings as aliases.
pub fn dtype() -> PossibleValuesParser {
    PossibleValuesParser::new([
        PossibleValue::new("auto"),
        PossibleValue::new("f32").alias("float32"),
        PossibleValue::new("bf16").alias("bfloat16"),
        PossibleValue::new("f16").alias("float16"),
    ])
}

/// A device: auto, cpu, cuda or cuda:N (whether that GPU is there is checked when the model loads).
pub fn device(text: &str) -> Result<String, String> {
    let gpu_index = text.strip_prefix("cuda:").is_some_and(|i| i.parse::<usize>().is_ok());
    if matches!(text, "auto" | "cpu" | "cuda") || gpu_index {
        Ok(text.to_string())
    } else {
        Err(format!("unknown device '{text}' (use auto, cpu, cuda or cuda:N)"))
    }
}

/// The conversation templates.
pub fn template() -> PossibleValuesParser {
    names::<stic::text::Template>()
}

/// The benchmarks of `stic eval` (the registry's names).
pub fn benchmark() -> PossibleValuesParser {
    one_of(stic::eval::benchmarks::names())
}

/// The shipped profiles of `stic reproduce`: the folders under configs/ that hold a reproduce.yaml (build.rs
/// lists them).
pub fn profile() -> PossibleValuesParser {
    one_of(env!("STIC_PROFILES").split(',').filter(|name| !name.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::builder::TypedValueParser;

    fn names(parser: &PossibleValuesParser) -> Vec<String> {
        parser
            .possible_values()
            .into_iter()
            .flatten()
            .flat_map(|v| v.get_name_and_aliases().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn every_listed_dtype_and_device_is_read_by_the_session() {
        for name in names(&dtype()) {
            stic::generate::session::parse_dtype(&name, tch::Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["auto", "cpu", "cuda", "cuda:3"] {
            assert_eq!(device(name).as_deref(), Ok(name));
        }
        for name in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(device(name).unwrap_err().contains("cuda:N"), "{name}");
        }
    }

    #[test]
    fn the_listed_profiles_are_the_shipped_ones() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let listed = names(&profile());
        assert!(listed.contains(&"official".to_string()) && listed.contains(&"paper".to_string()), "{listed:?}");
        for name in listed {
            stic::reproduce::Profile::path_of(root, &name).unwrap();
        }
    }

    #[test]
    fn value_enums_list_their_names_and_parse_them() {
        use stic::image::Processing;
        let cmd = clap::Command::new("t");
        let arg = clap::Arg::new("p");
        assert_eq!(names(&super::names::<Processing>()), ["llava", "transformers"]);
        for (name, processing) in [("llava", Processing::Llava), ("transformers", Processing::Transformers)] {
            let parsed = value_enum::<Processing>().parse_ref(&cmd, Some(&arg), std::ffi::OsStr::new(name)).unwrap();
            assert_eq!(parsed, processing);
        }
        assert!(value_enum::<Processing>().parse_ref(&cmd, Some(&arg), std::ffi::OsStr::new("hf")).is_err());
        assert_eq!(names(&template()), ["mistral_instruct", "vicuna_v1", "llava_v1", "chatml_direct"]);
    }
}
