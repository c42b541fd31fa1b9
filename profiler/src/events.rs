//! Ring-buffer bytes -> typed events. Malformed records become a [`DecodeError`] (counted as
//! lost by the caller), never a panic.
use profiler_common::{EVENT_KIND_STALL, StallEvent};

/// An event sent by the kernel programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stall(StallEvent),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {len} bytes is too short for its kind ({needed} bytes needed)")]
    TooShort { len: usize, needed: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let kind = read::<u32>(bytes)?;
    match kind {
        EVENT_KIND_STALL => Ok(Event::Stall(read::<StallEvent>(bytes)?)),
        kind => Err(DecodeError::UnknownKind { kind }),
    }
}

/// Reads a plain `#[repr(C)]` value from the start of `bytes`.
fn read<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let needed = size_of::<T>();
    if bytes.len() < needed {
        return Err(DecodeError::TooShort { len: bytes.len(), needed });
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
        bytes
    }

    #[test]
    fn a_stall_event_round_trips() {
        let event = StallEvent { kind: EVENT_KIND_STALL, tid: 7, start_ns: 100, end_ns: 250_000_100 };
        assert_eq!(decode(&bytes_of(&event)), Ok(Event::Stall(event)));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        let event = StallEvent { kind: EVENT_KIND_STALL, tid: 7, start_ns: 1, end_ns: 2 };
        let bytes = bytes_of(&event);
        assert_eq!(decode(&bytes[..20]), Err(DecodeError::TooShort { len: 20, needed: 24 }));
        assert_eq!(decode(&bytes[..2]), Err(DecodeError::TooShort { len: 2, needed: 4 }));
        assert_eq!(decode(&99u32.to_ne_bytes()), Err(DecodeError::UnknownKind { kind: 99 }));
        assert_eq!(decode(&[]), Err(DecodeError::TooShort { len: 0, needed: 4 }));
    }
}
