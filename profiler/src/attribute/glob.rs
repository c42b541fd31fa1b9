//! Rule patterns: `*` matches any run of characters, and what the first `*` matched can name
//! the category (`*Command` -> `command:keys`).

/// Matches `text` against a pattern where `*` matches any run of characters; returns what the
/// first `*` matched (empty without one), or `None`.
pub(super) fn glob(pattern: &str, text: &str) -> Option<String> {
    let Some((prefix, rest)) = pattern.split_once('*') else {
        return (pattern == text).then(String::new);
    };
    let remainder = text.strip_prefix(prefix)?;
    // The shortest capture after which the rest of the pattern matches.
    (0..=remainder.len())
        .filter(|&end| remainder.is_char_boundary(end))
        .find(|&end| wildcard_match(rest.as_bytes(), &remainder.as_bytes()[end..]))
        .map(|end| remainder[..end].to_owned())
}

/// `*`-wildcard matching in O(pattern x text), backtracking only to the last `*` (a rules file
/// with many stars cannot make it blow up).
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                last_star = Some((p, t));
                p += 1;
            }
            Some(&byte) if byte == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match last_star {
                Some((star, matched_from)) => {
                    last_star = Some((star, matched_from + 1));
                    p = star + 1;
                    t = matched_from + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&byte| byte == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_capture_what_the_first_star_matched() {
        assert_eq!(glob("*Command", "keysCommand").as_deref(), Some("keys"));
        assert_eq!(
            glob("*decay*", "je_arena_decay_to_limit").as_deref(),
            Some("je_arena_")
        );
        assert_eq!(
            glob("zmalloc*", "zmalloc_usable").as_deref(),
            Some("_usable")
        );
        assert_eq!(glob("call", "call").as_deref(), Some(""));
        assert_eq!(glob("call", "callback"), None);
        assert_eq!(glob("*Command", "keysCommandX"), None);
        assert_eq!(glob("a*b*c", "axxbyyc").as_deref(), Some("xx"));
        assert_eq!(glob("a*b*c", "axxbyy"), None);
    }

    #[test]
    fn many_stars_do_not_blow_up() {
        let pattern = format!("{}b", "*a".repeat(40));
        let text = "a".repeat(200);
        let started = std::time::Instant::now();
        assert_eq!(glob(&pattern, &text), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
