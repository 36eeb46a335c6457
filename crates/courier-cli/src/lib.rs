//! Library half of the `courier` command-line tool: the `verify` experiment runner, usable from
//! tests (the chaos matrix in `integration/`) as well as from the binary.

pub mod admin;
pub mod proxy;
pub mod verify;

use std::time::Duration;

/// Parse `250ms`, `10s`, `5m`, `1h` (a bare number is seconds).
pub fn humantime_parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}
