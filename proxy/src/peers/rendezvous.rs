//! Which replica owns a digest: rendezvous (highest random weight)
//! hashing. Every replica computes the same owner from the same member
//! list without talking to the others, and a replica joining or leaving
//! moves only the digests it gains or held.

use std::net::SocketAddr;

use sha2::{Digest as _, Sha256};

use crate::oci::Digest;

/// The member with the highest score for `digest`.
pub fn owner<'a>(
    digest: &Digest,
    members: impl IntoIterator<Item = &'a SocketAddr>,
) -> Option<SocketAddr> {
    members
        .into_iter()
        .max_by_key(|m| (score(m, digest), **m))
        .copied()
}

fn score(member: &SocketAddr, digest: &Digest) -> u64 {
    let mut h = Sha256::new();
    h.update(member.to_string().as_bytes());
    h.update(b"/");
    h.update(digest.hex().as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| {
                Digest::parse(&format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(i.to_string()))
                ))
                .unwrap()
            })
            .collect()
    }

    fn members(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8444)))
            .collect()
    }

    #[test]
    fn ownership_is_spread_and_does_not_depend_on_order() {
        let m = members(3);
        let mut reversed = m.clone();
        reversed.reverse();
        let mut counts = [0usize; 3];
        for d in digests(3000) {
            let o = owner(&d, &m).unwrap();
            assert_eq!(Some(o), owner(&d, &reversed));
            counts[m.iter().position(|x| *x == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_what_it_owned() {
        let m = members(4);
        let gone = m[2];
        let rest: Vec<_> = m.iter().copied().filter(|x| *x != gone).collect();
        for d in digests(2000) {
            let before = owner(&d, &m).unwrap();
            let after = owner(&d, &rest).unwrap();
            if before != gone {
                assert_eq!(before, after, "{d}");
            }
        }
        assert_eq!(owner(&digests(1)[0], &[]), None);
    }
}
