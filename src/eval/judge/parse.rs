//! Reading the scores out of the judges' replies, as the official scripts read them.
use crate::eval::python::parse_python_float;

/// `parse_score`: the first line, commas read as spaces, must split on single
/// spaces into exactly two numbers.
pub fn parse_review_scores(review: &str) -> Option<[f64; 2]> {
    let first_line = review.split('\n').next().unwrap_or_default().replace(',', " ");
    match first_line.split(' ').collect::<Vec<_>>()[..] {
        [first, second] => Some([parse_python_float(first)?, parse_python_float(second)?]),
        _ => None,
    }
}

/// The first space-separated word of the reply as a number in [0, 1]. The
/// official range check lets `nan` through (NaN compares false); here it
/// counts as unreadable, so it cannot turn the averages into NaN.
pub fn parse_mm_vet_score(reply: &str) -> Option<f64> {
    let score = parse_python_float(reply.split(' ').next().unwrap_or_default())?;
    (0.0..=1.0).contains(&score).then_some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_score_parsing_matches_parse_score() {
        assert_eq!(parse_review_scores("8 7\nexplanation"), Some([8.0, 7.0]));
        assert_eq!(parse_review_scores("8,7"), Some([8.0, 7.0]));
        assert_eq!(parse_review_scores("9.5 6"), Some([9.5, 6.0]));
        // ", " becomes two spaces, hence three fields: rejected as in the official script.
        assert_eq!(parse_review_scores("8, 7"), None);
        assert_eq!(parse_review_scores("Scores: 8 7"), None);
        assert_eq!(parse_review_scores("8"), None);
    }

    #[test]
    fn mm_vet_score_parsing() {
        assert_eq!(parse_mm_vet_score("0.5"), Some(0.5));
        assert_eq!(parse_mm_vet_score("1.0 totally"), Some(1.0));
        // `content.split(" ")[0].strip()`: the first field is stripped of other whitespace.
        assert_eq!(parse_mm_vet_score("0.8\n"), Some(0.8));
        assert_eq!(parse_mm_vet_score("0"), Some(0.0));
        assert_eq!(parse_mm_vet_score("0.5."), None);
        assert_eq!(parse_mm_vet_score("nan"), None);
        assert_eq!(parse_mm_vet_score("1.5"), None);
        assert_eq!(parse_mm_vet_score(" 0.5"), None); // first space-separated field is empty
        assert_eq!(parse_mm_vet_score("wrong"), None);
    }
}
