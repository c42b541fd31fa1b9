//! What a stack is made of, shared by every stage after unwinding: where the thread was when a
//! stack was taken ([`StackKind`]) and each frame's meaning ([`Frame`]). Outputs give frames
//! their text form (`output::frame_text`); the stages in between match on the type.
use std::rc::Rc;

use serde::{Deserialize, Serialize};

/// Where the event-loop thread was when a stack was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StackKind {
    /// Running on a CPU (a perf-event sample).
    OnCpu,
    /// Blocked off the CPU (sleep, I/O, lock, page fault...).
    OffCpu,
    /// Runnable but waiting for a CPU (preempted, or woken and not yet running).
    Runqueue,
}

impl StackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnCpu => "on_cpu",
            Self::OffCpu => "off_cpu",
            Self::Runqueue => "runqueue",
        }
    }
}

/// One frame of a symbolized stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    /// A kernel function.
    Kernel(Rc<str>),
    /// A kernel address no symbol covers.
    KernelAddress(u64),
    /// A user-space function (of the executable or a library).
    User(Rc<str>),
    /// User code no symbol covers: the module's name and the address's offset in its file.
    Unnamed { module: Rc<str>, offset: u64 },
    /// User code no symbol covers, in a function that these commands jump to at their end
    /// (`del|unlink`; see `tail_calls`).
    TailCalled {
        module: Rc<str>,
        offset: u64,
        commands: Rc<str>,
    },
    /// A user address outside every known mapping.
    Unknown,
    /// The lighter stacks of a stall beyond the listed ones, summed.
    OtherStacks,
}

impl Frame {
    /// The user function's name, for a user frame.
    pub fn user_function(&self) -> Option<&str> {
        match self {
            Self::User(name) => Some(name),
            _ => None,
        }
    }
}
