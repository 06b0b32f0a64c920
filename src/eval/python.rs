//! The Python (and NumPy) built-ins the official scorers lean on, for the places where their results decide a
//! verdict: the official scripts compare the strings `float()`, `int()`, `round()` and `repr(float)` produce.

/// `str.isspace()`, the whitespace of `str.strip()` and `str.split()`: Rust's `char::is_whitespace` (Unicode
/// White_Space) plus the ASCII separators U+001C..U+001F, which Python counts as whitespace and Rust does not.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `text.strip()`.
pub fn strip(text: &str) -> &str {
    text.trim_matches(is_space)
}

/// `text.split()`: runs of whitespace separate words, and there are no empty words.
pub fn split(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_space).filter(|word| !word.is_empty())
}

/// The first code point of each run of ten Unicode decimal digits (category Nd) as Python 3.11's
/// `unicodedata` (Unicode 14.0) lists them: `[c for c in range(0x110000) if unicodedata.decimal(chr(c), -1) == 0]`.
/// Every run holds the digits 0 to 9 in order.
#[rustfmt::skip]
const DECIMAL_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66, 0xDE6, 0xE50,
    0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40,
    0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10, 0x104A0, 0x10D30, 0x11066,
    0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11950,
    0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6,
    0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// The value of a decimal digit of any script (`unicodedata.decimal(c)`): what `\d` of Python's `re`, `int()`
/// and `float()` accept, e.g. Arabic-Indic `٣` or fullwidth `３`.
pub fn decimal_value(c: char) -> Option<u32> {
    let code = u32::from(c);
    let run = DECIMAL_ZEROS.partition_point(|&zero| zero <= code).checked_sub(1)?;
    let value = code - DECIMAL_ZEROS[run];
    (value < 10).then_some(value)
}

/// `\d` of Python's `re` on a `str` pattern.
pub fn is_decimal(c: char) -> bool {
    decimal_value(c).is_some()
}

/// Python's `float(text)`: surrounding whitespace allowed, decimal digits of any script, `inf`/`nan`
/// spellings, and `_` only between digits.
pub fn parse_python_float(text: &str) -> Option<f64> {
    python_number_text(text)?.parse().ok()
}

/// Python's `int(text)` for base-10 strings, returned as `str(int(text))`.
pub fn parse_python_int(text: &str) -> Option<String> {
    let digits = python_number_text(text)?;
    let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(&digits);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i128>().ok().map(|n| n.to_string())
}

/// The text `float()` and `int()` parse: stripped, every decimal digit made ASCII, digit-separating
/// underscores removed; `None` if another non-ASCII character or underscore is left. Unlike `str.strip()`,
/// they strip Unicode White_Space only, not U+001C..U+001F: `float("\x1c7")` fails.
fn python_number_text(text: &str) -> Option<String> {
    let ascii: String = text
        .trim()
        .chars()
        .map(|c| decimal_value(c).map_or(Some(c), |d| char::from_digit(d, 10)).filter(char::is_ascii))
        .collect::<Option<_>>()?;
    without_digit_underscores(&ascii)
}

/// Removes underscores that separate digits; `None` if any other underscore is present.
fn without_digit_underscores(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let separates_digits =
        |i: usize| i > 0 && i + 1 < chars.len() && chars[i - 1].is_ascii_digit() && chars[i + 1].is_ascii_digit();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        match c {
            '_' if separates_digits(i) => {}
            '_' => return None,
            _ => out.push(c),
        }
    }
    Some(out)
}

/// Python's `round(x, ndigits)` on a float (round-half-even on the exact binary value).
pub fn python_round(x: f64, ndigits: usize) -> f64 {
    // Rust's fixed-precision formatting rounds the exact value half-to-even, as CPython does.
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

/// NumPy's `round(np.float64(x), decimals)`: `rint(x * 10**decimals) / 10**decimals`.
/// Unlike Python's `round` it rounds the scaled product, e.g. 0.35 -> 0.4 where Python gives 0.3.
pub fn numpy_round(x: f64, decimals: u32) -> f64 {
    let scale = 10f64.powi(decimals as i32);
    (x * scale).round_ties_even() / scale
}

/// Python's `repr(x)` / `str(x)` for a float: shortest round-trip digits,
/// always a decimal point, scientific notation outside `1e-4 <= |x| < 1e16`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').expect("`{:e}` always writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let int_len = exponent as usize + 1;
            let padded = format!("{digits:0<int_len$}");
            let (int_part, frac_part) = padded.split_at(int_len);
            let frac_part = if frac_part.is_empty() { "0" } else { frac_part };
            format!("{sign}{int_part}.{frac_part}")
        } else {
            let zeros = "0".repeat((-exponent - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_parsing_matches_float_builtin() {
        assert_eq!(parse_python_float(" 12.5 "), Some(12.5));
        assert_eq!(parse_python_float("1_000.5"), Some(1000.5));
        assert_eq!(parse_python_float("1e3"), Some(1000.0));
        assert_eq!(parse_python_float(".5"), Some(0.5));
        assert!(parse_python_float("-Infinity").unwrap().is_infinite());
        assert_eq!(parse_python_float("1,000"), None);
        assert_eq!(parse_python_float("_1"), None);
        assert_eq!(parse_python_float("1__0"), None);
        assert_eq!(parse_python_float("12%"), None);
        // float("٣") == 3.0, float("١٢.٥") == 12.5, float("\u30007\x85") == 7.0; float("\x1c7"), float("²") and
        // float("3\u30004") fail.
        assert_eq!(parse_python_float("٣"), Some(3.0));
        assert_eq!(parse_python_float("١٢.٥"), Some(12.5));
        assert_eq!(parse_python_float("\u{3000}7\u{85}"), Some(7.0));
        assert_eq!(parse_python_float("\u{1c}7"), None);
        assert_eq!(parse_python_float("²"), None);
        assert_eq!(parse_python_float("3\u{3000}4"), None);
    }

    #[test]
    fn python_whitespace_is_isspace() {
        // The four information separators are whitespace to Python's str.split() and str.strip() only.
        for c in ['\u{1c}', '\u{1d}', '\u{1e}', '\u{1f}', ' ', '\t', '\u{85}', '\u{a0}', '\u{3000}'] {
            assert!(is_space(c), "{c:?}");
        }
        for c in ['\u{200b}', '\u{180e}', 'a', '_'] {
            assert!(!is_space(c), "{c:?}");
        }
        // "a\x1cb c".split() == ["a", "b", "c"]; " \x1fA\x1e".strip() == "A"
        assert_eq!(split("a\u{1c}b c").collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(strip(" \u{1f}A\u{1e}"), "A");
        assert_eq!(split(" \u{3000} ").count(), 0);
    }

    #[test]
    fn decimal_digits_of_every_script() {
        // unicodedata.decimal: ٣ 3, ３ 3, ߉ 9 (NKo), 𝟘 0 (double-struck), 𝟿 9 (monospace, the last of five runs)
        for (c, value) in [('٣', 3), ('３', 3), ('\u{7c9}', 9), ('\u{1d7d8}', 0), ('\u{1d7ff}', 9), ('7', 7)] {
            assert_eq!(decimal_value(c), Some(value), "{c:?}");
        }
        // Not decimal: superscript two (a digit, not a decimal), Roman numeral one, a letter.
        for c in ['²', 'Ⅰ', 'x', '\u{2f}', '\u{3a}'] {
            assert_eq!(decimal_value(c), None, "{c:?}");
        }
    }

    #[test]
    fn python_int_parsing_matches_int_builtin() {
        assert_eq!(parse_python_int(" +007 ").as_deref(), Some("7"));
        assert_eq!(parse_python_int("-0").as_deref(), Some("0"));
        assert_eq!(parse_python_int("1_000").as_deref(), Some("1000"));
        assert_eq!(parse_python_int("12.0"), None);
        assert_eq!(parse_python_int("-"), None);
        assert_eq!(parse_python_int("1e3"), None);
        // int("٤٢") == 42, int("\u3000７\u3000") == 7
        assert_eq!(parse_python_int("٤٢").as_deref(), Some("42"));
        assert_eq!(parse_python_int("\u{3000}７\u{3000}").as_deref(), Some("7"));
    }

    #[test]
    fn python_round_is_half_even_on_the_binary_value() {
        assert_eq!(python_round(0.125, 2), 0.12); // exact tie, rounds to even
        assert_eq!(python_round(0.375, 2), 0.38);
        assert_eq!(python_round(2.675, 2), 2.67); // 2.675 is stored as 2.67499...
        assert_eq!(python_round(2.5, 0), 2.0);
        assert_eq!(python_round(1.456, 2), 1.46);
    }

    #[test]
    fn python_float_repr_matches_repr() {
        assert_eq!(python_float_repr(3.0), "3.0");
        assert_eq!(python_float_repr(0.0), "0.0");
        assert_eq!(python_float_repr(-0.0), "-0.0");
        assert_eq!(python_float_repr(1.46), "1.46");
        assert_eq!(python_float_repr(123456.0), "123456.0");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(-2.5e20), "-2.5e+20");
        assert_eq!(python_float_repr(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn numpy_round_rounds_the_scaled_product() {
        // 0.35 is stored as 0.34999..., but 0.35 * 10 rounds to 3.5, a tie that rint sends to 4.
        assert_eq!(numpy_round(0.35, 1), 0.4);
        assert_eq!(python_round(0.35, 1), 0.3);
        assert_eq!(numpy_round(0.15, 1), 0.2);
        // 51.650000000000006 * 10 rounds to 516.5 exactly: to even, 516.
        assert_eq!(numpy_round(51.650000000000006, 1), 51.6);
        assert_eq!(python_round(51.650000000000006, 1), 51.7);
        assert_eq!(numpy_round(66.66666666666667, 1), 66.7);
        assert_eq!(numpy_round(12.25, 1), 12.2);
    }
}
