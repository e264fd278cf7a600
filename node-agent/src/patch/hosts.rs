//! `/etc/hosts`: one marker-delimited block mapping each hijacked registry
//! name to the proxy. Every byte outside the block is kept as it is; the
//! file is handled as bytes (it need not be UTF-8).
//!
//! The block takes the file's line ending (CRLF or LF, from its first line
//! break) and always ends with one, so a line an admin appends later
//! (`echo "10.1.1.1 db" >> /etc/hosts`) is a line of its own, never part of
//! the closing marker. Appended to a file without a final newline, the
//! block follows a line break the agent added, and says so in its opening
//! marker ([`BEGIN_AFTER_ADDED_BREAK`]): [`revert`] takes that break away
//! again when nothing follows the block, giving back the exact original
//! bytes without any outside record.

use std::net::IpAddr;

use super::PatchError;

/// Opening marker line of the managed block.
pub const BEGIN: &str = "# >>> pullthrough-agent: managed block, do not edit (`pullthrough-agent revert` removes it) >>>";
/// Opening marker line of a block appended to a file that ended without a
/// line break: the break before the block is the agent's.
pub const BEGIN_AFTER_ADDED_BREAK: &str = "# >>> pullthrough-agent: managed block, do not edit (`pullthrough-agent revert` removes it; the line break before it is the agent's) >>>";
/// Closing marker line of the managed block.
pub const END: &str = "# <<< pullthrough-agent <<<";
const BEGIN_PREFIX: &[u8] = b"# >>> pullthrough-agent";
const END_PREFIX: &[u8] = b"# <<< pullthrough-agent";

/// One hosts line in the block: `address name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsEntry {
    pub address: IpAddr,
    pub name: String,
}

/// The patched file and remarks for the operator (e.g. earlier lines that
/// shadow a block entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsPatched {
    pub bytes: Vec<u8>,
    pub notes: Vec<String>,
}

/// A line: its content (without `\n` and a trailing `\r`) and its full
/// slice including the terminator.
struct Line<'a> {
    start: usize,
    end: usize, // exclusive, after the terminator
    content: &'a [u8],
    terminator: &'a [u8],
}

fn lines(bytes: &[u8]) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let nl = bytes[start..].iter().position(|&b| b == b'\n');
        let (end, content_end) = match nl {
            Some(i) => {
                let nl_at = start + i;
                let content_end = if nl_at > start && bytes[nl_at - 1] == b'\r' {
                    nl_at - 1
                } else {
                    nl_at
                };
                (nl_at + 1, content_end)
            }
            None => (bytes.len(), bytes.len()),
        };
        out.push(Line {
            start,
            end,
            content: &bytes[start..content_end],
            terminator: &bytes[content_end..end],
        });
        start = end;
    }
    out
}

/// Where the existing block is: indices of its opening and closing lines.
fn find_block(ls: &[Line<'_>]) -> Result<Option<(usize, usize)>, PatchError> {
    let mut begin = None;
    let mut found = None;
    for (i, l) in ls.iter().enumerate() {
        if l.content.starts_with(BEGIN_PREFIX) {
            if begin.is_some() || found.is_some() {
                return Err(PatchError::new(format!(
                    "line {}: a second `# >>> pullthrough-agent` block; fix the file by hand (keep one block)",
                    i + 1
                )));
            }
            begin = Some(i);
        } else if l.content.starts_with(END_PREFIX) {
            match begin.take() {
                Some(b) => found = Some((b, i)),
                None => {
                    return Err(PatchError::new(format!(
                        "line {}: `# <<< pullthrough-agent` closing marker without an opening one; fix the file by hand",
                        i + 1
                    )));
                }
            }
        }
    }
    if let Some(b) = begin {
        return Err(PatchError::new(format!(
            "line {}: `# >>> pullthrough-agent` block is not closed; fix the file by hand",
            b + 1
        )));
    }
    Ok(found)
}

fn render_block(entries: &[HostsEntry], eol: &[u8], added_break: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let begin = if added_break {
        BEGIN_AFTER_ADDED_BREAK
    } else {
        BEGIN
    };
    out.extend_from_slice(begin.as_bytes());
    out.extend_from_slice(eol);
    for e in entries {
        out.extend_from_slice(format!("{}\t{}", e.address, e.name).as_bytes());
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(END.as_bytes());
    out.extend_from_slice(eol);
    out
}

/// The line break before the block at lines `b..=e` is the agent's: its
/// opening marker says so, or (a block an earlier version appended to a
/// file without a final newline) it ends the file without one.
fn added_break(ls: &[Line<'_>], b: usize, e: usize) -> bool {
    ls[b].content == BEGIN_AFTER_ADDED_BREAK.as_bytes() || ls[e].terminator.is_empty()
}

/// The file with the block set to `entries` (added at the end if absent,
/// replaced in place if present, removed if `entries` is empty).
pub fn apply(current: &[u8], entries: &[HostsEntry]) -> Result<HostsPatched, PatchError> {
    let ls = lines(current);
    let block = find_block(&ls)?;
    let notes = shadowing_notes(&ls, block, entries);
    let bytes = match block {
        Some((b, e)) => {
            let eol = ls[b].terminator;
            let added = added_break(&ls, b, e);
            let prefix = &current[..ls[b].start];
            let suffix = &current[ls[e].end..];
            if entries.is_empty() {
                remove_block(prefix, suffix, eol, added)
            } else {
                let mut out = prefix.to_vec();
                out.extend(render_block(entries, eol, added));
                out.extend_from_slice(suffix);
                out
            }
        }
        None if entries.is_empty() => current.to_vec(),
        None => {
            let eol: &[u8] = match ls.iter().find(|l| !l.terminator.is_empty()) {
                Some(l) => l.terminator,
                None => b"\n",
            };
            let mut out = current.to_vec();
            if current.is_empty() || current.ends_with(b"\n") {
                out.extend(render_block(entries, eol, false));
            } else {
                out.extend_from_slice(eol);
                out.extend(render_block(entries, eol, true));
            }
            out
        }
    };
    check(&bytes, entries)?;
    Ok(HostsPatched { bytes, notes })
}

/// The health gate's "closed" state: an existing block keeps its markers
/// and place but loses every entry (so the names resolve as without the
/// proxy, and reopening puts the entries back where they were, ahead of
/// anything after the block); a file without a block is left as it is.
pub fn empty_block(current: &[u8]) -> Result<HostsPatched, PatchError> {
    let ls = lines(current);
    let bytes = match find_block(&ls)? {
        None => current.to_vec(),
        Some((b, e)) => {
            let eol = ls[b].terminator;
            let mut out = current[..ls[b].start].to_vec();
            out.extend(render_block(&[], eol, added_break(&ls, b, e)));
            out.extend_from_slice(&current[ls[e].end..]);
            out
        }
    };
    check(&bytes, &[])?;
    Ok(HostsPatched {
        bytes,
        notes: Vec::new(),
    })
}

fn remove_block(prefix: &[u8], suffix: &[u8], eol: &[u8], added_break: bool) -> Vec<u8> {
    let mut out = prefix.to_vec();
    // The block was appended to a file without a final newline, after a
    // line break the agent added: take that break away again, unless
    // someone appended lines after the block (they need it).
    if added_break && suffix.is_empty() && out.ends_with(eol) && !eol.is_empty() {
        out.truncate(out.len() - eol.len());
    }
    out.extend_from_slice(suffix);
    out
}

/// The file without the block (unchanged when there is none).
pub fn revert(current: &[u8]) -> Result<Vec<u8>, PatchError> {
    apply(current, &[]).map(|p| p.bytes)
}

/// The entries in the block, for `status`.
pub fn block_entries(current: &[u8]) -> Result<Vec<(String, String)>, PatchError> {
    let ls = lines(current);
    let Some((b, e)) = find_block(&ls)? else {
        return Ok(Vec::new());
    };
    Ok(ls[b + 1..e]
        .iter()
        .filter_map(|l| {
            let text = String::from_utf8_lossy(l.content);
            let mut f = text.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect())
}

/// Parse-back check: exactly one well-formed block holding the entries.
fn check(bytes: &[u8], entries: &[HostsEntry]) -> Result<(), PatchError> {
    let got = block_entries(bytes)?;
    let want: Vec<(String, String)> = entries
        .iter()
        .map(|e| (e.address.to_string(), e.name.clone()))
        .collect();
    if got != want {
        return Err(PatchError::new(format!(
            "internal error: the rendered block holds {got:?}, expected {want:?}"
        )));
    }
    Ok(())
}

/// Lines outside the block that already map a name the block maps: the
/// resolver takes the first match, so those win.
fn shadowing_notes(
    ls: &[Line<'_>],
    block: Option<(usize, usize)>,
    entries: &[HostsEntry],
) -> Vec<String> {
    let mut notes = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        if block.is_some_and(|(b, e)| (b..=e).contains(&i)) {
            continue;
        }
        let text = String::from_utf8_lossy(l.content);
        let text = text.split('#').next().unwrap_or("");
        let mut fields = text.split_whitespace();
        let Some(addr) = fields.next() else { continue };
        for name in fields {
            if entries.iter().any(|e| e.name.eq_ignore_ascii_case(name)) {
                let wins = block.is_none_or(|(b, _)| i < b);
                notes.push(format!(
                    "line {} already maps {name} to {addr}{}",
                    i + 1,
                    if wins {
                        "; it comes first, so it wins over pullthrough's entry"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries() -> Vec<HostsEntry> {
        vec![
            HostsEntry {
                address: "10.0.0.5".parse().unwrap(),
                name: "quay.io".into(),
            },
            HostsEntry {
                address: "10.0.0.5".parse().unwrap(),
                name: "gcr.io".into(),
            },
        ]
    }

    #[test]
    fn appends_a_block_and_removes_it_again() {
        let orig = b"127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n# comment\n";
        let p = apply(orig, &entries()).unwrap();
        let text = String::from_utf8(p.bytes.clone()).unwrap();
        assert!(text.starts_with(std::str::from_utf8(orig).unwrap()));
        assert!(text.ends_with(&format!(
            "{BEGIN}\n10.0.0.5\tquay.io\n10.0.0.5\tgcr.io\n{END}\n"
        )));
        assert_eq!(revert(&p.bytes).unwrap(), orig);
    }

    #[test]
    fn no_trailing_newline_and_crlf_are_kept() {
        let orig = b"127.0.0.1 localhost";
        let p = apply(orig, &entries()).unwrap();
        assert!(p.bytes.ends_with(format!("{END}\n").as_bytes()));
        assert!(
            String::from_utf8_lossy(&p.bytes)
                .starts_with(&format!("127.0.0.1 localhost\n{BEGIN_AFTER_ADDED_BREAK}\n"))
        );
        assert_eq!(revert(&p.bytes).unwrap(), orig);
        // A block an earlier version appended without a final newline.
        let old = format!("127.0.0.1 localhost\n{BEGIN}\n10.0.0.5\tquay.io\n{END}");
        assert_eq!(revert(old.as_bytes()).unwrap(), orig);
        let again = apply(old.as_bytes(), &entries()).unwrap().bytes;
        assert_eq!(revert(&again).unwrap(), orig);

        let orig = b"127.0.0.1 localhost\r\n::1 localhost\r\n";
        let p = apply(orig, &entries()).unwrap();
        assert!(
            String::from_utf8_lossy(&p.bytes)
                .contains(&format!("{BEGIN}\r\n10.0.0.5\tquay.io\r\n"))
        );
        assert_eq!(revert(&p.bytes).unwrap(), orig);
    }

    /// On a file without a final newline, a line an admin appends after
    /// the block (`echo "10.1.1.1 db" >> /etc/hosts`) stays a line of its
    /// own through the next apply and a revert.
    #[test]
    fn a_line_appended_after_the_block_survives() {
        let orig = b"127.0.0.1 localhost";
        let once = apply(orig, &entries()).unwrap().bytes;
        let mut edited = once.clone();
        edited.extend_from_slice(b"10.1.1.1 db\n");
        let again = apply(&edited, &entries()).unwrap().bytes;
        assert_eq!(
            String::from_utf8_lossy(&again),
            String::from_utf8_lossy(&edited)
        );
        assert_eq!(
            revert(&edited).unwrap(),
            b"127.0.0.1 localhost\n10.1.1.1 db\n"
        );
        // Nothing appended: the original comes back byte for byte.
        assert_eq!(revert(&once).unwrap(), orig);
    }

    #[test]
    fn ipv6_proxy_address() {
        let e = vec![HostsEntry {
            address: "fd00::5".parse().unwrap(),
            name: "quay.io".into(),
        }];
        let p = apply(b"", &e).unwrap();
        assert_eq!(
            String::from_utf8(p.bytes.clone()).unwrap(),
            format!("{BEGIN}\nfd00::5\tquay.io\n{END}\n")
        );
        assert_eq!(revert(&p.bytes).unwrap(), b"");
    }

    #[test]
    fn block_in_the_middle_is_replaced_in_place() {
        let first = apply(b"a\n", &entries()).unwrap().bytes;
        let mut edited = first.clone();
        edited.extend_from_slice(b"1.2.3.4 added.later\n");
        let fewer = apply(&edited, &entries()[..1]).unwrap().bytes;
        assert_eq!(
            String::from_utf8(fewer.clone()).unwrap(),
            format!("a\n{BEGIN}\n10.0.0.5\tquay.io\n{END}\n1.2.3.4 added.later\n")
        );
        assert_eq!(revert(&fewer).unwrap(), b"a\n1.2.3.4 added.later\n");
    }

    #[test]
    fn broken_markers_are_refused() {
        for bad in [
            format!("{BEGIN}\n1.2.3.4 x\n"),
            format!("x\n{END}\n"),
            format!("{BEGIN}\n{END}\n{BEGIN}\n{END}\n"),
        ] {
            let e = apply(bad.as_bytes(), &entries()).unwrap_err();
            assert!(e.0.contains("pullthrough-agent"), "{e}");
            assert!(revert(bad.as_bytes()).is_err());
        }
    }

    #[test]
    fn earlier_mappings_are_reported() {
        let p = apply(b"1.1.1.1 quay.io # pinned\n", &entries()).unwrap();
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
        assert!(p.notes[0].contains("line 1") && p.notes[0].contains("wins"));
    }

    /// Foreign hosts content: lines of arbitrary bytes (tabs, comments,
    /// IPv6, CR, non-UTF-8), none of them our markers, with or without a
    /// final newline.
    fn foreign() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            "[ \t]*[0-9a-f:.]{1,20}[ \t]+[a-z.-]{1,12}( #[^\n]*)?",
            "#[^\n]*",
            "[ \t]*",
            prop::collection::vec(any::<u8>(), 0..20)
                .prop_map(|v| String::from_utf8_lossy(&v).replace('\n', " ")),
        ];
        (
            prop::collection::vec(line, 0..8),
            prop::bool::ANY,
            prop::bool::ANY,
        )
            .prop_map(|(ls, crlf, final_nl)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let ls: Vec<String> = ls
                    .into_iter()
                    .filter(|l| !l.contains("pullthrough-agent"))
                    .collect();
                let mut s = ls.join(eol);
                if final_nl && !s.is_empty() {
                    s.push_str(eol);
                }
                s.into_bytes()
            })
    }

    fn some_entries() -> impl Strategy<Value = Vec<HostsEntry>> {
        prop::collection::vec(
            (any::<IpAddr>(), "[a-z]{1,8}\\.[a-z]{2,3}")
                .prop_map(|(address, name)| HostsEntry { address, name }),
            0..5,
        )
    }

    proptest! {
        #[test]
        fn foreign_bytes_survive_and_revert_is_exact(orig in foreign(), e in some_entries()) {
            let once = apply(&orig, &e).unwrap().bytes;
            // Everything before the block is the original, byte for byte.
            prop_assert!(once.starts_with(&orig) || once == orig);
            let twice = apply(&once, &e).unwrap().bytes;
            prop_assert_eq!(&twice, &once);
            prop_assert_eq!(revert(&once).unwrap(), orig.clone());
            // Changing the entries and reverting still gives the original.
            let other = apply(&once, &e[..e.len() / 2]).unwrap().bytes;
            prop_assert_eq!(revert(&other).unwrap(), orig);
        }

        #[test]
        fn content_added_around_the_block_is_kept(
            orig in foreign(), after in foreign(), e in some_entries()
        ) {
            let once = apply(&orig, &e).unwrap().bytes;
            prop_assert!(e.is_empty() || once.ends_with(b"\n"));
            prop_assume!(once.ends_with(b"\n"));
            let mut edited = once.clone();
            edited.extend_from_slice(&after);
            let again = apply(&edited, &e).unwrap().bytes;
            prop_assert_eq!(&again, &edited);
            let reverted = revert(&edited).unwrap();
            let mut expect = orig.clone();
            // The agent's line break after an original without a final
            // newline stays when lines follow the block.
            if !orig.is_empty() && !orig.ends_with(b"\n") && !after.is_empty() {
                let eol: &[u8] = if once[orig.len()..].starts_with(b"\r\n") { b"\r\n" } else { b"\n" };
                expect.extend_from_slice(eol);
            }
            if !e.is_empty() { expect.extend_from_slice(&after); } else { expect = edited.clone(); }
            prop_assert_eq!(reverted, expect);
        }
    }

    #[test]
    fn empty_block_keeps_markers_and_place() {
        let e = |a: &str, n: &str| HostsEntry {
            address: a.parse().unwrap(),
            name: n.into(),
        };
        let base = b"127.0.0.1 localhost\n".to_vec();
        let on = apply(&base, &[e("10.0.0.5", "quay.io")]).unwrap().bytes;
        let mut with_tail = on.clone();
        with_tail.extend_from_slice(b"10.0.0.9 quay.io\n");
        let off = empty_block(&with_tail).unwrap().bytes;
        let text = String::from_utf8(off.clone()).unwrap();
        assert!(text.contains(BEGIN) && text.contains(END), "{text}");
        assert!(!text.contains("10.0.0.5"), "{text}");
        assert!(text.ends_with("10.0.0.9 quay.io\n"), "{text}");
        // Reopened: the entry is back in the block, before the tail.
        let back = apply(&off, &[e("10.0.0.5", "quay.io")]).unwrap().bytes;
        assert_eq!(back, with_tail);
        // No block: nothing to empty.
        assert_eq!(empty_block(&base).unwrap().bytes, base);
        // Revert of an emptied block gives the original back.
        assert_eq!(revert(&empty_block(&on).unwrap().bytes).unwrap(), base);
    }
}
