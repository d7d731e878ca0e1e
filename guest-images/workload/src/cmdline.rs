//! The workload's command-line options (`key=value` words; unknown keys are ignored).

/// How pages are visited in a pass.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Every page of the share in address order.
    Sequential,
    /// Every page of the share in a seeded pseudo-random permutation (new each pass).
    Random,
    /// As many accesses as pages, 90% to a hot 10% of the share, the rest anywhere.
    Hotset,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::Hotset => "hotset",
        }
    }
}

/// A deliberate CPU exception, to test the stub's exception report (`fault=pf|gp|ud`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Read an address outside the identity map (#PF, vector 14).
    Page,
    /// Read a non-canonical address (#GP, vector 13).
    GeneralProtection,
    /// Execute `ud2` (#UD, vector 6).
    InvalidOpcode,
}

/// The parsed options.
#[derive(Clone, Copy)]
pub struct Options {
    /// Bytes to exercise; `None` = all usable RAM.
    pub span: Option<u64>,
    pub pattern: Pattern,
    /// Percentage of accesses in passes after the first that rewrite the page.
    pub writes: u64,
    /// Number of passes (0 = forever).
    pub passes: u64,
    pub seed: u64,
    /// TSC rate from the VMM (0 = unknown).
    pub tsc_khz: u64,
    /// Test hook: vCPU 0 raises this exception after the start line.
    pub fault: Option<Fault>,
}

/// Default span when the command line has no workload option at all.
const QUICK_SPAN: u64 = 64 << 20;
/// Default number of passes.
const DEFAULT_PASSES: u64 = 2;

/// A command-line word the guest could not use.
pub struct BadOption<'a> {
    pub word: &'a [u8],
}

/// Parses the command line. With none of the workload's own keys present the result is the
/// quick default workload (span=64M passes=2).
pub fn parse(line: &[u8]) -> Result<Options, BadOption<'_>> {
    let mut o = Options {
        span: None,
        pattern: Pattern::Sequential,
        writes: 100,
        passes: DEFAULT_PASSES,
        seed: 1,
        tsc_khz: 0,
        fault: None,
    };
    let mut any_workload_key = false;
    for word in line.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        let Some(eq) = word.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        let bad = BadOption { word };
        match key {
            b"span" => o.span = Some(parse_size(value).ok_or(bad)?),
            b"pattern" => {
                o.pattern = match value {
                    b"sequential" => Pattern::Sequential,
                    b"random" => Pattern::Random,
                    b"hotset" => Pattern::Hotset,
                    _ => return Err(bad),
                }
            }
            b"writes" => {
                o.writes = parse_u64(value).filter(|&w| w <= 100).ok_or(bad)?;
            }
            b"passes" => o.passes = parse_u64(value).ok_or(bad)?,
            b"seed" => o.seed = parse_u64(value).ok_or(bad)?,
            b"fault" => {
                o.fault = Some(match value {
                    b"pf" => Fault::Page,
                    b"gp" => Fault::GeneralProtection,
                    b"ud" => Fault::InvalidOpcode,
                    _ => return Err(bad),
                });
                continue;
            }
            b"tsc_khz" => {
                o.tsc_khz = parse_u64(value).ok_or(bad)?;
                continue;
            }
            _ => continue,
        }
        any_workload_key = true;
    }
    if !any_workload_key {
        o.span = Some(QUICK_SPAN);
    }
    Ok(o)
}

/// Decimal (or 0x hex) number.
fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// A byte count with an optional K/M/G/T suffix (powers of 1024).
fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let v = parse_u64(num)?;
    v.checked_mul(1u64 << shift)
}
