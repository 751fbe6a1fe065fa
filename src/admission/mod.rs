//! Admission control: the pure decision core of the orchestrator.
//!
//! Owns the bookkeeping that decides whether a request runs now, waits, or is rejected: the
//! slots of each deployment, the bounded priority queue of each model, the memory ledger, and the
//! estimates behind `Retry-After`. Everything here takes state, a clock reading (`now`) and
//! randomness as arguments and returns decisions; it does no I/O, spawns nothing, and reads no
//! clock, so that it can be tested exhaustively. The `orchestrator` module carries decisions out.
//!
//! Files: `queue` (the bounded priority queue), `ledger` (the memory budget), `model` (one
//! model's slots, queue and the decisions over them). Rejections are typed
//! ([`crate::reason::RejectReason`]); this module imports nothing that does I/O.

use std::fmt;

use serde::{Deserialize, Serialize};

mod ledger;
mod model;
mod queue;

pub(crate) use ledger::{Ledger, MemVerdict, MemoryLimits};
pub(crate) use model::{Admit, Grant, ModelCore, ModelLimits, Outcome, Reslot, Slot, Wake};
pub(crate) use queue::{Push, WaitKey, WaitQueue};

/// A request's priority: `x-mofa-priority` or the body's `priority`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];

    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            "critical" => Some(Priority::Critical),
            _ => None,
        }
    }

    /// `low`, `normal`, `high` or `critical`, in any case (a request's own words).
    pub fn from_word(s: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
