//! Ring-buffer bytes -> typed events. Malformed records become a [`DecodeError`] (counted as
//! lost by the caller), never a panic.
use profiler_common::{
    AcceptEvent, ConnectionEvent, EVENT_KIND_ACCEPT, EVENT_KIND_CONNECTION,
    EVENT_KIND_CONNECTION_CLOSED, EVENT_KIND_EXEC, EVENT_KIND_FAULTING, EVENT_KIND_MADVISE,
    EVENT_KIND_OFF_CPU, EVENT_KIND_ON_CPU, EVENT_KIND_PAGE_FAULT, EVENT_KIND_STALL, ExecEvent,
    FaultingEvent, MadviseEvent, StackEvent, StallEvent,
};

/// An event sent by the kernel programs.
#[derive(Clone, Copy)]
pub enum Event<'a> {
    Stall(StallEvent),
    /// On- or off-CPU stack sample, borrowed from the ring buffer.
    Stack(&'a StackEvent),
    /// A page-fault sample with its stacks, borrowed from the ring buffer.
    PageFault(&'a StackEvent),
    Madvise(MadviseEvent),
    /// A connection entered an accept queue.
    Connection(ConnectionEvent),
    /// A connection to a listener closed.
    ConnectionClosed(ConnectionEvent),
    Accept(AcceptEvent),
    Exec(ExecEvent),
    /// A target took page faults the fault programs, attached on demand, did not see.
    Faulting(FaultingEvent),
}

impl Event<'_> {
    /// The pid of the target the event is about.
    pub fn pid(&self) -> u32 {
        match self {
            Event::Stall(event) => event.pid,
            Event::Stack(event) | Event::PageFault(event) => event.pid,
            Event::Madvise(event) => event.pid,
            Event::Connection(event) | Event::ConnectionClosed(event) => event.pid,
            Event::Accept(event) => event.pid,
            Event::Exec(event) => event.pid,
            Event::Faulting(event) => event.pid,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {len} bytes is too short for its kind ({needed} bytes needed)")]
    TooShort { len: usize, needed: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("stack event is misaligned")]
    Misaligned,
    #[error("stack event claims {claimed} {what}, more than its {capacity}")]
    BadLength {
        what: &'static str,
        claimed: usize,
        capacity: usize,
    },
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let kind = read::<u32>(bytes)?;
    match kind {
        EVENT_KIND_STALL => Ok(Event::Stall(read::<StallEvent>(bytes)?)),
        EVENT_KIND_ON_CPU | EVENT_KIND_OFF_CPU => Ok(Event::Stack(stack_event(bytes)?)),
        EVENT_KIND_PAGE_FAULT => Ok(Event::PageFault(stack_event(bytes)?)),
        EVENT_KIND_MADVISE => Ok(Event::Madvise(read::<MadviseEvent>(bytes)?)),
        EVENT_KIND_CONNECTION => Ok(Event::Connection(read::<ConnectionEvent>(bytes)?)),
        EVENT_KIND_CONNECTION_CLOSED => {
            Ok(Event::ConnectionClosed(read::<ConnectionEvent>(bytes)?))
        }
        EVENT_KIND_ACCEPT => Ok(Event::Accept(read::<AcceptEvent>(bytes)?)),
        EVENT_KIND_EXEC => Ok(Event::Exec(read::<ExecEvent>(bytes)?)),
        EVENT_KIND_FAULTING => Ok(Event::Faulting(read::<FaultingEvent>(bytes)?)),
        kind => Err(DecodeError::UnknownKind { kind }),
    }
}

/// Views a stack event in place (it is 20 KiB: no copy), checking its lengths.
fn stack_event(bytes: &[u8]) -> Result<&StackEvent, DecodeError> {
    let needed = size_of::<StackEvent>();
    if bytes.len() < needed {
        return Err(DecodeError::TooShort {
            len: bytes.len(),
            needed,
        });
    }
    if bytes.as_ptr().align_offset(align_of::<StackEvent>()) != 0 {
        return Err(DecodeError::Misaligned);
    }
    // SAFETY: long enough and aligned (ring-buffer records are 8-byte aligned), and StackEvent
    // is Pod: any bytes are a valid value.
    let event = unsafe { &*bytes.as_ptr().cast::<StackEvent>() };
    let checks = [
        (
            "kernel frames",
            event.kernel_frames as usize,
            event.kernel_stack.len(),
        ),
        (
            "user-stack bytes",
            event.user_stack_len as usize,
            event.user_stack.len(),
        ),
        (
            "request bytes",
            event.request_len as usize,
            event.request.len(),
        ),
    ];
    for (what, claimed, capacity) in checks {
        if claimed > capacity {
            return Err(DecodeError::BadLength {
                what,
                claimed,
                capacity,
            });
        }
    }
    Ok(event)
}

/// Reads a plain `#[repr(C)]` value from the start of `bytes`.
fn read<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let needed = size_of::<T>();
    if bytes.len() < needed {
        return Err(DecodeError::TooShort {
            len: bytes.len(),
            needed,
        });
    }
    // SAFETY: T is Pod (any bit pattern is valid) and `bytes` holds at least size_of::<T>() bytes;
    // read_unaligned copes with the ring buffer's 8-byte alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(event: &StallEvent) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(event.kind.to_ne_bytes());
        bytes.extend(event.tid.to_ne_bytes());
        bytes.extend(event.start_ns.to_ne_bytes());
        bytes.extend(event.end_ns.to_ne_bytes());
        bytes.extend(event.poll_handed_off.to_ne_bytes());
        bytes.extend(event.pid.to_ne_bytes());
        bytes
    }

    fn error_of(bytes: &[u8]) -> DecodeError {
        decode(bytes).err().expect("an error")
    }

    #[test]
    fn a_stall_event_round_trips() {
        let event = StallEvent {
            kind: EVENT_KIND_STALL,
            tid: 7,
            start_ns: 100,
            end_ns: 250_000_100,
            poll_handed_off: 1,
            pid: 7,
        };
        assert!(matches!(decode(&bytes_of(&event)), Ok(Event::Stall(decoded)) if decoded == event));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        let event = StallEvent {
            kind: EVENT_KIND_STALL,
            tid: 7,
            start_ns: 1,
            end_ns: 2,
            poll_handed_off: 0,
            pid: 7,
        };
        let bytes = bytes_of(&event);
        assert_eq!(
            error_of(&bytes[..20]),
            DecodeError::TooShort {
                len: 20,
                needed: 32
            }
        );
        assert_eq!(
            error_of(&bytes[..2]),
            DecodeError::TooShort { len: 2, needed: 4 }
        );
        assert_eq!(
            error_of(&99u32.to_ne_bytes()),
            DecodeError::UnknownKind { kind: 99 }
        );
        assert_eq!(error_of(&[]), DecodeError::TooShort { len: 0, needed: 4 });
        assert!(matches!(
            error_of(&EVENT_KIND_ON_CPU.to_ne_bytes()),
            DecodeError::TooShort { .. }
        ));
    }

    /// An 8-byte-aligned buffer holding a stack event with the given lengths.
    fn stack_bytes(kernel_frames: u32, user_stack_len: u32) -> Vec<u64> {
        let words = size_of::<StackEvent>() / 8;
        let mut buffer = vec![0u64; words];
        // SAFETY: the buffer is large enough and aligned for a StackEvent.
        let event = unsafe { &mut *buffer.as_mut_ptr().cast::<StackEvent>() };
        event.kind = EVENT_KIND_ON_CPU;
        event.kernel_frames = kernel_frames;
        event.user_stack_len = user_stack_len;
        buffer
    }

    fn as_bytes(words: &[u64]) -> &[u8] {
        // SAFETY: u64s viewed as bytes.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
    }

    #[test]
    fn a_stack_event_is_viewed_in_place_and_its_lengths_are_checked() {
        let good = stack_bytes(3, 4096);
        assert!(
            matches!(decode(as_bytes(&good)), Ok(Event::Stack(event)) if event.kernel_frames == 3)
        );
        let too_many_frames = stack_bytes(65, 0);
        assert!(matches!(
            error_of(as_bytes(&too_many_frames)),
            DecodeError::BadLength {
                what: "kernel frames",
                ..
            }
        ));
        let too_many_bytes = stack_bytes(0, 1 << 20);
        assert!(matches!(
            error_of(as_bytes(&too_many_bytes)),
            DecodeError::BadLength {
                what: "user-stack bytes",
                ..
            }
        ));
        let bytes = as_bytes(&good);
        assert!(matches!(
            error_of(&bytes[..bytes.len() - 1]),
            DecodeError::TooShort { .. }
        ));
    }

    proptest::proptest! {
        /// Fuzzing: arbitrary bytes, and valid kinds with arbitrary bodies, never panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_stack_event_body_decodes_or_fails_cleanly(kernel_frames in 0u32..200, user_stack_len in 0u32..40_000, kind in 0u32..6) {
            let mut words = stack_bytes(kernel_frames, user_stack_len);
            words[0] = u64::from(kind);
            let _ = decode(as_bytes(&words));
        }
    }
}
