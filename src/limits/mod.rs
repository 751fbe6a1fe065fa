//! The rate-limit decision core: GCRA buckets ([`gcra`]), charging several buckets of one
//! principal at once (all or none), the token estimate charged before a call, and OpenAI's
//! duration format of the `x-ratelimit-reset-*` headers. State and `now` in, decisions out:
//! no I/O, no clock, no HTTP crate, no tokio (the stores are `quota`'s).

pub(crate) mod gcra;

pub(crate) use gcra::{Check, Rate, Status};

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dim {
    Requests,
    Tokens,
}

impl Dim {
    /// The envelope `type` of a 429 for this limit (as OpenAI).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Dim::Requests => "requests",
            Dim::Tokens => "tokens",
        }
    }
}

/// One bucket to charge: its rate, what it counts, and the cost of this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charge {
    pub rate: Rate,
    pub dim: Dim,
    pub cost: u64,
}

/// Why a request does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Denial {
    pub dim: Dim,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    /// When it would fit; `None`: never (more than a whole period's allowance).
    pub retry_after_us: Option<u64>,
}

/// Charges every bucket of `charges` (whose TATs are `tats`, in the same order) at `now`, or
/// none of them: on success the TATs are updated and each bucket's status returned; on a
/// refusal, the first bucket that refused with the longest wait among the refusals.
pub(crate) fn charge_all(
    charges: &[Charge],
    tats: &mut [u64],
    now: u64,
) -> Result<Vec<Status>, Denial> {
    let mut new = Vec::with_capacity(charges.len());
    let mut denial: Option<Denial> = None;
    for (c, &tat) in charges.iter().zip(tats.iter()) {
        match c.rate.check(tat, now, c.cost) {
            Check::Allowed { tat, status } => new.push((tat, status)),
            Check::Denied {
                retry_after_us,
                used,
            } => {
                let d = Denial {
                    dim: c.dim,
                    limit: c.rate.limit,
                    used,
                    requested: c.cost,
                    retry_after_us: Some(retry_after_us),
                };
                denial = Some(worse(denial, d));
            }
            Check::TooLarge => {
                let d = Denial {
                    dim: c.dim,
                    limit: c.rate.limit,
                    used: 0,
                    requested: c.cost,
                    retry_after_us: None,
                };
                denial = Some(worse(denial, d));
            }
        }
    }
    if let Some(d) = denial {
        return Err(d);
    }
    let mut out = Vec::with_capacity(new.len());
    for (slot, (tat, status)) in tats.iter_mut().zip(new) {
        *slot = tat;
        out.push(status);
    }
    Ok(out)
}

/// The refusal to report of two: one that never fits, else the longer wait.
fn worse(a: Option<Denial>, b: Denial) -> Denial {
    match a {
        None => b,
        Some(a) => match (a.retry_after_us, b.retry_after_us) {
            (None, _) => a,
            (_, None) => b,
            (Some(x), Some(y)) if y > x => b,
            _ => a,
        },
    }
}

/// The tokens charged before a call, as OpenAI counts: prompt characters / 4 (rounded up) plus
/// the completion budget (`max_tokens` or `max_completion_tokens`; 0 when unset).
pub(crate) fn estimate_tokens(prompt_chars: u64, max_tokens: u64) -> u64 {
    prompt_chars.div_ceil(4).saturating_add(max_tokens)
}

/// A duration in OpenAI's format of `x-ratelimit-reset-*`: `12ms`, `1s`, `1.5s`, `6m0s`,
/// `1h2m3s` (whole seconds from a minute on).
pub(crate) fn openai_duration(us: u64) -> String {
    let ms = us.div_ceil(1000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        let (s, frac) = (ms / 1000, ms % 1000);
        if frac == 0 {
            return format!("{s}s");
        }
        let f = format!("{frac:03}");
        return format!("{s}.{}s", f.trim_end_matches('0'));
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

/// `Retry-After` in whole seconds (at least 1) and `retry-after-ms` (at least 1) for a wait.
pub(crate) fn retry_after(us: u64) -> (u64, u64) {
    let ms = us.div_ceil(1000).max(1);
    (ms.div_ceil(1000).max(1), ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_openai_writes_them() {
        assert_eq!(openai_duration(0), "0ms");
        assert_eq!(openai_duration(12_000), "12ms");
        assert_eq!(openai_duration(1_000_000), "1s");
        assert_eq!(openai_duration(1_500_000), "1.5s");
        assert_eq!(openai_duration(360_000_000), "6m0s");
        assert_eq!(openai_duration(3_723_000_000), "1h2m3s");
        assert_eq!(retry_after(1), (1, 1));
        assert_eq!(retry_after(1_200_000), (2, 1200));
    }

    #[test]
    fn all_or_none() {
        let charges = [
            Charge {
                rate: Rate::per_minute(10),
                dim: Dim::Requests,
                cost: 1,
            },
            Charge {
                rate: Rate::per_minute(100),
                dim: Dim::Tokens,
                cost: 60,
            },
        ];
        let mut tats = [0, 0];
        assert!(charge_all(&charges, &mut tats, 1).is_ok());
        let before = tats;
        let d = charge_all(&charges, &mut tats, 1).unwrap_err();
        assert_eq!(d.dim, Dim::Tokens);
        assert_eq!((d.limit, d.used, d.requested), (100, 60, 60));
        assert_eq!(tats, before, "a refusal charges nothing");
        assert_eq!(estimate_tokens(9, 5), 8);
    }
}
