//! Value parsers of the flags that take one of a closed set: clap lists the choices in `--help` and refuses any
//! other value (exit 2) with a message that lists them.
use clap::builder::{PossibleValue, PossibleValuesParser, Str, TypedValueParser};

pub fn one_of<S: Into<Str>>(names: impl IntoIterator<Item = S>) -> PossibleValuesParser {
    PossibleValuesParser::new(names.into_iter().map(PossibleValue::new))
}

/// One of `names`, parsed into `T` (the names are `T`'s own spellings).
pub fn parsed<T, S>(names: impl IntoIterator<Item = S>) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
    S: Into<Str>,
{
    one_of(names).try_map(|name| name.parse::<T>().map_err(|e| e.to_string()))
}

/// A value of a serde enum as the configs spell it.
pub fn serde_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).expect("a unit variant")
}

/// The dtypes `stic::session::parse_dtype` reads, with its long spellings as aliases.
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

/// The image and prompt processings (`stic::image::Processing`).
pub fn processing() -> impl TypedValueParser<Value = stic::image::Processing> {
    parsed(["llava", "transformers"])
}

/// The conversation templates.
pub fn template() -> PossibleValuesParser {
    one_of(stic::text::Template::ALL.map(stic::text::Template::name))
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
        parser.possible_values().into_iter().flatten().flat_map(|v| v.get_name_and_aliases().map(str::to_string).collect::<Vec<_>>()).collect()
    }

    #[test]
    fn every_listed_dtype_and_device_is_read_by_the_session() {
        for name in names(&dtype()) {
            stic::session::parse_dtype(&name, tch::Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
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
            stic::stic::reproduce::Profile::path_of(root, &name).unwrap();
        }
    }

    #[test]
    fn processings_parse() {
        let cmd = clap::Command::new("t");
        let arg = clap::Arg::new("p");
        for name in ["llava", "transformers"] {
            processing().parse_ref(&cmd, Some(&arg), std::ffi::OsStr::new(name)).unwrap();
        }
        assert!(processing().parse_ref(&cmd, Some(&arg), std::ffi::OsStr::new("hf")).is_err());
    }
}
