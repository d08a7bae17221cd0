//! Routable QUIC connection ids (QUIC-LB, draft-ietf-quic-load-balancers).
//!
//! Behind an L4 balancer, a connection's packets must reach the host that
//! holds it even after the client's address changes (NAT rebinding,
//! migration), when a 4-tuple hash would send them elsewhere. With
//! `[cluster.quic_lb]` set, every connection id this host issues carries its
//! server id, so a balancer configured alike routes by the destination
//! connection id:
//!
//! ```text
//! first octet: config id (3 bits) | random (5 bits)
//! then:        server id || nonce, in the clear, or encrypted (AES-128-ECB) with a key
//! ```
//!
//! With a key, a server id and nonce of 16 octets together are encrypted in
//! one block ("single pass"); shorter ones with the draft's four-pass
//! Feistel construction, each half expanded into an AES block with a round
//! counter in its last octet. Under a key the nonce counts up from a
//! random start: one process never repeats one, and processes sharing a key
//! (a restart) only if their ranges happen to meet. Without a key
//! (plaintext), the nonce is random so connections cannot be linked by it.
//!
//! [`LbConfig::server_id_of`] is what the balancer does; the tests use it.

use aes::Aes128;
use aes::cipher::{BlockDecrypt as _, BlockEncrypt as _, KeyInit as _};
use std::fmt;
use std::sync::Arc;

/// Longest QUIC v1 connection id.
const MAX_CID: usize = 20;
/// The AES block.
const BLOCK: usize = 16;

/// Why a QUIC-LB configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LbConfigError {
    /// The config id does not fit its 3 bits, or is 7 (reserved: unroutable).
    #[error("config_id must be 0..=6 (7 marks an unroutable id), got {0}")]
    ConfigId(u8),
    /// The server id is empty or over 15 octets.
    #[error("server_id must be 1..=15 octets, got {0}")]
    ServerIdLen(usize),
    /// The nonce is under 4 octets, or the id would exceed 20.
    #[error(
        "nonce_len must be at least 4 and server_id + nonce_len at most 19 octets, \
         got {nonce} + {server_id}"
    )]
    NonceLen {
        /// Nonce octets.
        nonce: usize,
        /// Server id octets.
        server_id: usize,
    },
    /// With a key, server id and nonce must fit one AES block.
    #[error(
        "with a key, server_id + nonce_len must be at most 16 octets \
         (one AES block), got {0}"
    )]
    TooLongToEncrypt(usize),
}

/// One QUIC-LB configuration: how ids are laid out and protected.
#[derive(Clone)]
pub struct LbConfig {
    config_id: u8,
    server_id: Vec<u8>,
    nonce_len: usize,
    cipher: Option<Aes128>,
}

impl fmt::Debug for LbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never reaches a log.
        f.debug_struct("LbConfig")
            .field("config_id", &self.config_id)
            .field("server_id_len", &self.server_id.len())
            .field("nonce_len", &self.nonce_len)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

impl LbConfig {
    /// A configuration; `key` `None` is the plaintext algorithm.
    ///
    /// # Errors
    /// When the lengths or the config id are out of the draft's bounds.
    pub fn new(
        config_id: u8,
        server_id: &[u8],
        nonce_len: usize,
        key: Option<[u8; BLOCK]>,
    ) -> Result<Self, LbConfigError> {
        if config_id > 6 {
            return Err(LbConfigError::ConfigId(config_id));
        }
        if !(1..=15).contains(&server_id.len()) {
            return Err(LbConfigError::ServerIdLen(server_id.len()));
        }
        let plain = server_id.len() + nonce_len;
        if nonce_len < 4 || plain > MAX_CID - 1 {
            return Err(LbConfigError::NonceLen {
                nonce: nonce_len,
                server_id: server_id.len(),
            });
        }
        if key.is_some() && plain > BLOCK {
            return Err(LbConfigError::TooLongToEncrypt(plain));
        }
        Ok(Self {
            config_id,
            server_id: server_id.to_vec(),
            nonce_len,
            cipher: key.map(|k| Aes128::new(&k.into())),
        })
    }

    /// Octets of every id: the first octet, the server id and the nonce.
    #[must_use]
    pub fn cid_len(&self) -> usize {
        1 + self.server_id.len() + self.nonce_len
    }

    /// The id of `nonce` (`nonce_len` octets) with `first_bits` as the first
    /// octet's 5 free bits.
    ///
    /// # Panics
    /// If `nonce` is not `nonce_len` octets.
    #[must_use]
    pub fn encode(&self, nonce: &[u8], first_bits: u8) -> Vec<u8> {
        assert_eq!(nonce.len(), self.nonce_len, "nonce length");
        let mut cid = Vec::with_capacity(self.cid_len());
        cid.push((self.config_id << 5) | (first_bits & 0x1f));
        cid.extend_from_slice(&self.server_id);
        cid.extend_from_slice(nonce);
        if let Some(cipher) = &self.cipher {
            let body = &mut cid[1..];
            if body.len() == BLOCK {
                cipher.encrypt_block(body.into());
            } else {
                four_pass(cipher, body, true);
            }
        }
        cid
    }

    /// What a balancer reads from a destination connection id: the server
    /// id, or `None` when the id is not of this configuration.
    #[must_use]
    pub fn server_id_of(&self, cid: &[u8]) -> Option<Vec<u8>> {
        if cid.len() != self.cid_len() || cid[0] >> 5 != self.config_id {
            return None;
        }
        let mut body = cid[1..].to_vec();
        if let Some(cipher) = &self.cipher {
            if body.len() == BLOCK {
                cipher.decrypt_block(body.as_mut_slice().into());
            } else {
                four_pass(cipher, &mut body, false);
            }
        }
        body.truncate(self.server_id.len());
        Some(body)
    }
}

/// The draft's four-pass Feistel network over `body` (under 16 octets), in
/// place: forward encrypts, backward decrypts. An odd octet count splits its
/// middle octet between the halves, each half then MSB-aligned.
fn four_pass(cipher: &Aes128, body: &mut [u8], forward: bool) {
    let bits = body.len() * 4;
    let mut left = take_bits(body, 0, bits);
    let mut right = take_bits(body, bits, bits);
    // Each round: target ^= truncate(AES(expand(source, counter))).
    let round = |source: &[u8; BLOCK], target: &mut [u8; BLOCK], counter: u8| {
        let mut block = *source;
        block[BLOCK - 1] = counter;
        cipher.encrypt_block((&mut block).into());
        for (i, t) in target.iter_mut().enumerate().take(bits.div_ceil(8)) {
            *t ^= block[i] & mask(bits, i);
        }
    };
    if forward {
        round(&left, &mut right, 1);
        round(&right, &mut left, 2);
        round(&left, &mut right, 3);
        round(&right, &mut left, 4);
    } else {
        round(&right, &mut left, 4);
        round(&left, &mut right, 3);
        round(&right, &mut left, 2);
        round(&left, &mut right, 1);
    }
    body.fill(0);
    put_bits(body, 0, bits, &left);
    put_bits(body, bits, bits, &right);
}

/// The bits of octet `i` that belong to a value `bits` long, MSB-aligned.
fn mask(bits: usize, i: usize) -> u8 {
    let left = bits.saturating_sub(i * 8);
    if left >= 8 { 0xff } else { !(0xffu8 >> left) }
}

/// `len` bits of `src` from bit `start`, MSB-aligned in a zeroed block.
fn take_bits(src: &[u8], start: usize, len: usize) -> [u8; BLOCK] {
    let mut out = [0u8; BLOCK];
    for b in 0..len {
        let bit = (src[(start + b) / 8] >> (7 - (start + b) % 8)) & 1;
        out[b / 8] |= bit << (7 - b % 8);
    }
    out
}

/// Writes the first `len` bits of `src` into `dst` from bit `start`.
fn put_bits(dst: &mut [u8], start: usize, len: usize, src: &[u8; BLOCK]) {
    for b in 0..len {
        let bit = (src[b / 8] >> (7 - b % 8)) & 1;
        dst[(start + b) / 8] |= bit << (7 - (start + b) % 8);
    }
}

impl LbConfig {
    /// The configuration `settings` (validated) name, its key read from its file.
    ///
    /// # Errors
    /// When the key file cannot be read or does not hold 32 hex digits.
    pub fn load(settings: &bulkhead_core::config::QuicLb) -> anyhow::Result<Self> {
        let key = match &settings.key_file {
            Some(path) => Some(super::read_hex_key::<BLOCK>(
                path,
                "QUIC-LB key",
                "a 16-byte AES-128 key",
            )?),
            None => None,
        };
        Ok(Self::new(
            settings.config_id,
            &settings.server_id,
            usize::from(settings.nonce_len),
            key,
        )?)
    }
}

/// quinn's connection id source for an endpoint with a QUIC-LB configuration.
#[derive(Debug)]
pub struct LbCidGenerator {
    config: Arc<LbConfig>,
    /// The next nonce of an encrypted configuration.
    counter: u128,
}

impl LbCidGenerator {
    /// A generator whose nonces start at a random point.
    #[must_use]
    pub fn new(config: Arc<LbConfig>) -> Self {
        let mut start = [0u8; 16];
        getrandom::fill(&mut start).expect("the OS random source");
        Self {
            config,
            counter: u128::from_be_bytes(start),
        }
    }

    fn next_nonce(&mut self) -> Vec<u8> {
        let len = self.config.nonce_len;
        if self.config.cipher.is_some() {
            // Never the same nonce twice in this process (the counter wraps
            // after 2^(8 * nonce_len) ids).
            self.counter = self.counter.wrapping_add(1);
            self.counter.to_be_bytes()[BLOCK - len..].to_vec()
        } else {
            // In the clear: random, so ids do not link connections.
            let mut nonce = vec![0u8; len];
            getrandom::fill(&mut nonce).expect("the OS random source");
            nonce
        }
    }
}

impl quinn::ConnectionIdGenerator for LbCidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let nonce = self.next_nonce();
        let mut free = [0u8; 1];
        getrandom::fill(&mut free).expect("the OS random source");
        quinn::ConnectionId::new(&self.config.encode(&nonce, free[0]))
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator as _;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// The draft's worked example of the four-pass algorithm (an odd length,
    /// so the middle octet is split). Its key has a typo (`d30z66`); `a` is
    /// the digit that reproduces every intermediate AES output it lists.
    #[test]
    fn the_drafts_four_pass_example() {
        let key: [u8; 16] = hex("fdf726a9893ec05c0632d30a6680baf0").try_into().unwrap();
        let config = LbConfig::new(0, &hex("31441a"), 4, Some(key)).unwrap();
        let cid = config.encode(&hex("9c69c275"), 0x07);
        assert_eq!(cid, hex("073705545a697be0"));
        assert_eq!(config.server_id_of(&cid), Some(hex("31441a")));
    }

    #[test]
    fn every_layout_round_trips_and_hides_the_server_id_under_a_key() {
        let key = [0x5au8; 16];
        for sid_len in 1..=12 {
            for nonce_len in 4..=(19 - sid_len) {
                let sid: Vec<u8> = (1..=u8::try_from(sid_len).unwrap()).collect();
                for key in [None, Some(key)] {
                    let Ok(config) = LbConfig::new(3, &sid, nonce_len, key) else {
                        assert!(key.is_some() && sid_len + nonce_len > 16);
                        continue;
                    };
                    let mut generator = LbCidGenerator::new(Arc::new(config.clone()));
                    let ids: Vec<_> = (0..50).map(|_| generator.generate_cid()).collect();
                    for id in &ids {
                        assert_eq!(id.len(), 1 + sid_len + nonce_len);
                        assert_eq!(id[0] >> 5, 3, "config id in the top bits");
                        assert_eq!(config.server_id_of(id), Some(sid.clone()));
                    }
                    let in_clear = ids.iter().filter(|id| id[1..=sid_len] == sid[..]).count();
                    if key.is_some() {
                        // By chance, one octet of ciphertext matches 1 in 256.
                        assert!(
                            in_clear < 10,
                            "{sid_len}+{nonce_len}: {in_clear} in the clear"
                        );
                    } else {
                        assert_eq!(in_clear, ids.len());
                    }
                    let distinct: std::collections::HashSet<_> = ids.iter().collect();
                    assert_eq!(distinct.len(), ids.len(), "ids repeat");
                }
            }
        }
    }

    #[test]
    fn ids_of_another_configuration_are_not_read_as_ours() {
        let ours = LbConfig::new(1, &[9, 9], 6, Some([1; 16])).unwrap();
        let other = LbConfig::new(2, &[9, 9], 6, Some([1; 16])).unwrap();
        let id = other.encode(&[0; 6], 0);
        assert_eq!(ours.server_id_of(&id), None, "another config id");
        assert_eq!(ours.server_id_of(&id[..8]), None, "another length");
        // Under another key the server id reads as something else.
        let rekeyed = LbConfig::new(1, &[9, 9], 6, Some([2; 16])).unwrap();
        let id = rekeyed.encode(&[0; 6], 0);
        assert_ne!(ours.server_id_of(&id), Some(vec![9, 9]));
    }

    #[test]
    fn the_key_is_read_from_its_file_and_never_quoted() {
        let dir = std::env::temp_dir().join(format!("bh-quic-lb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lb.key");
        let settings = |key_file: Option<std::path::PathBuf>| bulkhead_core::config::QuicLb {
            config_id: 1,
            server_id: vec![0x31, 0x44, 0x1a],
            nonce_len: 4,
            key_file,
        };
        std::fs::write(&file, "FDF726A9893EC05C0632D30A6680BAF0\n").unwrap();
        let loaded = LbConfig::load(&settings(Some(file.clone()))).unwrap();
        let key: [u8; 16] = hex("fdf726a9893ec05c0632d30a6680baf0").try_into().unwrap();
        let direct = LbConfig::new(1, &hex("31441a"), 4, Some(key)).unwrap();
        let nonce = hex("9c69c275");
        assert_eq!(loaded.encode(&nonce, 0), direct.encode(&nonce, 0));
        // No key file: the server id in the clear.
        let plain = LbConfig::load(&settings(None)).unwrap().encode(&nonce, 0);
        assert_eq!(plain[1..4], hex("31441a")[..]);
        // A malformed key is named by its file, its content never shown.
        std::fs::write(&file, "secret-not-hex-secret-not-hex-xx").unwrap();
        let err = format!(
            "{:#}",
            LbConfig::load(&settings(Some(file.clone()))).unwrap_err()
        );
        assert!(err.contains("lb.key must hold 32 hex digits"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let gone = dir.join("missing.key");
        let err = format!("{:#}", LbConfig::load(&settings(Some(gone))).unwrap_err());
        assert!(err.contains("reading the QUIC-LB key file") && err.contains("missing.key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_of_bounds_configurations_are_refused_by_name() {
        let err = |c: u8, sid: &[u8], n: usize, key: Option<[u8; 16]>| {
            LbConfig::new(c, sid, n, key).unwrap_err().to_string()
        };
        assert!(err(7, &[1], 8, None).contains("config_id must be 0..=6"));
        assert!(err(0, &[], 8, None).contains("server_id must be 1..=15 octets"));
        assert!(err(0, &[1; 16], 3, None).contains("server_id must be 1..=15"));
        assert!(err(0, &[1], 3, None).contains("nonce_len must be at least 4"));
        assert!(err(0, &[1; 10], 10, None).contains("at most 19"));
        assert!(err(0, &[1; 8], 9, Some([0; 16])).contains("at most 16 octets"));
        let debug = format!("{:?}", LbConfig::new(0, &[1], 8, Some([0xab; 16])).unwrap());
        assert!(!debug.contains("ab") && !debug.contains("171"), "{debug}");
    }
}
