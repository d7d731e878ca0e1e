//! Parsing sizes given on the command line ("512M", "2G", "1048576K").

/// Errors parsing a size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("'{0}' is not a size: expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    Malformed(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Parses a size in bytes. Suffixes K, M, G, T (optionally followed by "iB" or "B") are binary
/// multiples; a bare number is MiB, as for `--memory`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 1u64 << 10),
        Some('m') => (&stripped[..stripped.len() - 1], 1 << 20),
        Some('g') => (&stripped[..stripped.len() - 1], 1 << 30),
        Some('t') => (&stripped[..stripped.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (stripped, 1 << 20),
        _ => return Err(SizeError::Malformed(s.to_string())),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| SizeError::Malformed(s.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes_and_bare_mib() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256"), Ok(256 << 20));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_size("lots"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size(""), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }
}
