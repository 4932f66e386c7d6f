//! Tests of the peer links' handshake and record layer: a whole exchange, golden bytes of the
//! records, tampering of every kind refused, a wrong sharer key, a replayed handshake,
//! bounds, and random input.

use super::*;
use crate::bitfield::Bitfield;
use crate::client::identity::public_of;
use crate::rng::SplitMix64 as Rng;
use crate::wire::peer_link::{BlockRef, DownloaderMsg, MAX_DOWNLOADER_FRAME};
use crate::wire::{FileName, GroupId, Sha1Digest};

const DOWNLOADER: [u8; 32] = [0x11; 32];
const SHARER: [u8; 32] = [0x22; 32];

fn handshake_frame() -> Vec<u8> {
    let mut out = Vec::new();
    DownloaderMsg::handshake(
        GroupId::new("g").unwrap(),
        FileName::new("f").unwrap(),
        Sha1Digest([3; 20]),
    )
    .emit(&mut out);
    out
}

/// Everything a downloader and a sharer hold once linked.
struct Pair {
    /// What the sharer reads.
    serve: SealedDownloaderStream,
    /// What the downloader reads.
    fetch: SealedSharerStream,
    /// The downloader's sealer.
    d_sealer: Sealer,
    /// The sharer's sealer.
    s_sealer: Sealer,
    /// The bytes the downloader sent (preamble and message 1).
    first: Vec<u8>,
}

/// Feeds `bytes` to the sharer's stream and collects its events (frames copied out).
fn serve_feed(
    serve: &mut SealedDownloaderStream,
    mut bytes: &[u8],
) -> Result<Vec<Ev>, PeerSecureError> {
    let mut events = Vec::new();
    loop {
        while let Some(ev) = serve.next_event()? {
            events.push(match ev {
                ServeEvent::Hello(h) => Ev::Hello(h),
                ServeEvent::Frame(f) => Ev::Frame(f.to_vec()),
            });
        }
        if bytes.is_empty() {
            return Ok(events);
        }
        let spare = serve.spare();
        let n = spare.len().min(bytes.len());
        assert!(n > 0, "the buffer never fills with whole events inside");
        spare[..n].copy_from_slice(&bytes[..n]);
        serve.commit(n);
        bytes = &bytes[n..];
    }
}

enum Ev {
    Hello(Hello),
    Frame(Vec<u8>),
}

/// What the downloader's stream made of some bytes: messages, and blocks (opened into a
/// buffer of their own, standing in for the `.part`).
#[derive(Debug)]
enum Got {
    Established,
    Msg(SharerMsg),
    Block(u32, u32, Vec<u8>),
}

/// Feeds `bytes` to the downloader's stream, `step` bytes at a time at most.
fn fetch_feed(
    fetch: &mut SealedSharerStream,
    bytes: &[u8],
    step: usize,
    sealer: &mut Option<Sealer>,
) -> Result<Vec<Got>, PeerSecureError> {
    let mut got = Vec::new();
    let mut pos = 0;
    let mut block: Vec<u8> = Vec::new();
    loop {
        let n = match fetch.next_read() {
            SealedNext::Ready => 0,
            _ if pos == bytes.len() => break,
            SealedNext::Buffer(buf) => {
                let n = buf.len().min(step).min(bytes.len() - pos);
                buf[..n].copy_from_slice(&bytes[pos..pos + n]);
                n
            }
            SealedNext::BlockData { len, .. } => {
                let n = (len as usize).min(step).min(bytes.len() - pos);
                block.extend_from_slice(&bytes[pos..pos + n]);
                n
            }
        };
        pos += n;
        match fetch.filled(n)? {
            None => {}
            Some(SealedDecoded::Established(s)) => {
                *sealer = Some(s);
                got.push(Got::Established);
            }
            Some(SealedDecoded::Msg(m)) => got.push(Got::Msg(m)),
            Some(SealedDecoded::BlockStart { .. }) => block.clear(),
            Some(SealedDecoded::BlockSealed { piece, offset, .. }) => {
                fetch.open_block(&mut block)?;
                got.push(Got::Block(piece, offset, std::mem::take(&mut block)));
            }
        }
    }
    Ok(got)
}

fn linked() -> Pair {
    linked_with(CipherPrefs::AES_FIRST, CipherPrefs::AES_FIRST)
}

/// A downloader offering `d` linked to a sharer offering `s`.
fn linked_with(d: CipherPrefs, s: CipherPrefs) -> Pair {
    let mut first = Vec::new();
    let mut fetch = SealedSharerStream::new().with_prefs(d);
    let mut payload = Vec::new();
    payload.extend_from_slice(&handshake_frame());
    fetch
        .start(&DOWNLOADER, &public_of(&SHARER), &payload, &mut first)
        .unwrap();
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME).with_prefs(s);
    let mut events = serve_feed(&mut serve, &first).unwrap();
    assert_eq!(events.len(), 1);
    let Some(Ev::Hello(hello)) = events.pop() else {
        panic!("no hello");
    };
    assert_eq!(hello.remote_static, public_of(&DOWNLOADER));
    assert_eq!(hello.payload, payload);
    let mut d_sealer = None;
    let got = fetch_feed(&mut fetch, &hello.reply, 1, &mut d_sealer).unwrap();
    assert!(matches!(got.as_slice(), [Got::Established]), "{got:?}");
    assert!(fetch.is_open() && serve.is_open());
    Pair {
        serve,
        fetch,
        d_sealer: d_sealer.unwrap(),
        s_sealer: hello.sealer,
        first,
    }
}

fn have(piece: u32) -> impl FnOnce(&mut Vec<u8>) {
    move |o: &mut Vec<u8>| SharerMsg::Have { piece }.emit(o)
}

fn accept(n: usize) -> impl FnOnce(&mut Vec<u8>) {
    move |o: &mut Vec<u8>| SharerMsg::accept(Bitfield::full(n)).emit(o)
}

/// The sharer's answer and a block of 1000 bytes, as sealed bytes.
fn sharer_bytes(pair: &mut Pair, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    pair.s_sealer.seal_frame(&mut out, accept(3)).unwrap();
    pair.s_sealer.seal_frame(&mut out, have(2)).unwrap();
    pair.s_sealer.seal_block(&mut out, 1, 64, data).unwrap();
    out
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn a_whole_exchange_in_any_split() {
    for step in [1, 2, 3, 7, 13, 16, 17, 100, 4096] {
        let mut pair = linked();
        // Downloader to sharer: requests as records.
        let mut out = Vec::new();
        let request = DownloaderMsg::Request(BlockRef {
            piece: 1,
            offset: 64,
            len: 1000,
        });
        pair.d_sealer
            .seal_frame(&mut out, |o| request.emit(o))
            .unwrap();
        let mut plain = Vec::new();
        request.emit(&mut plain);
        let events = serve_feed(&mut pair.serve, &out).unwrap();
        assert!(
            matches!(events.as_slice(), [Ev::Frame(f)] if f[..] == plain[4..]),
            "step {step}"
        );
        // Sharer to downloader: the answer, a have, a block, whatever the read sizes.
        let block = data(1000);
        let bytes = sharer_bytes(&mut pair, &block);
        let got = fetch_feed(&mut pair.fetch, &bytes, step, &mut None).unwrap();
        match got.as_slice() {
            [Got::Msg(SharerMsg::Accept { .. }), Got::Msg(SharerMsg::Have { piece: 2 }), Got::Block(1, 64, b)] =>
            {
                assert_eq!(b, &block, "step {step}")
            }
            other => panic!("step {step}: {other:?}"),
        }
    }
}

#[test]
fn golden_records() {
    // Fixed keys: the record layout, the nonce rule (counter from 0, little-endian after four
    // zero bytes), the AAD (the length prefix; a block's header for its data) and the tag's
    // place (after the ciphertext) are pinned byte for byte.
    let mut sealer = Sealer::new([0x42; 32]);
    let mut out = Vec::new();
    sealer.seal_frame(&mut out, have(7)).unwrap();
    sealer.seal_block(&mut out, 1, 2, b"abc").unwrap();
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, GOLDEN_RECORDS, "{hex}");
    // The same bytes from RustCrypto's AES-128-GCM used directly, keyed with the first 16
    // bytes of the direction's key, as the README describes them (an implementation
    // independent of the one the links use).
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let nonce_of = |n: u64| aes_gcm::Nonce::from(nonce_bytes(n));
    let cipher = aes_gcm::Aes128Gcm::new(aes_gcm::Key::<aes_gcm::Aes128Gcm>::from_slice(
        &[0x42; 32][..16],
    ));
    let mut want = Vec::new();
    let frame = [0, 0, 0, 5, 0x83, 0, 0, 0, 7];
    want.extend_from_slice(&9u32.to_be_bytes());
    let mut body = frame.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(&nonce_of(0), &9u32.to_be_bytes(), &mut body)
        .unwrap();
    want.extend_from_slice(&body);
    want.extend_from_slice(&tag);
    let head = [0, 0, 0, 12, 0x84, 0, 0, 0, 1, 0, 0, 0, 2];
    want.extend_from_slice(&13u32.to_be_bytes());
    let mut body = head.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(&nonce_of(1), &13u32.to_be_bytes(), &mut body)
        .unwrap();
    want.extend_from_slice(&body);
    want.extend_from_slice(&tag);
    let mut body = b"abc".to_vec();
    let tag = cipher
        .encrypt_in_place_detached(&nonce_of(2), &head, &mut body)
        .unwrap();
    want.extend_from_slice(&body);
    want.extend_from_slice(&tag);
    assert_eq!(out, want);
    assert_eq!(nonce_bytes(0x0102), [0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
    // And the opener takes them back.
    let mut opener = Opener::new([0x42; 32]);
    let mut rec = out[4..4 + 9].to_vec();
    let tag: [u8; 16] = out[13..29].try_into().unwrap();
    opener.open(&out[..4], &mut rec, &tag).unwrap();
    assert_eq!(rec, frame);
}

#[test]
fn the_cipher_is_the_one_both_prefer() {
    use PeerCipher::{Aes128Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    let p = CipherPrefs::from_wire;
    let cases = [
        // (downloader, sharer, chosen)
        (CipherPrefs::AES_FIRST, CipherPrefs::AES_FIRST, Some(Aes)),
        (
            CipherPrefs::CHACHA_FIRST,
            CipherPrefs::CHACHA_FIRST,
            Some(ChaCha),
        ),
        // One side without AES instructions: ChaCha20, whichever side it is.
        (
            CipherPrefs::AES_FIRST,
            CipherPrefs::CHACHA_FIRST,
            Some(ChaCha),
        ),
        (
            CipherPrefs::CHACHA_FIRST,
            CipherPrefs::AES_FIRST,
            Some(ChaCha),
        ),
        // Only what both list.
        (p([1, 0]), CipherPrefs::CHACHA_FIRST, Some(Aes)),
        (CipherPrefs::CHACHA_FIRST, p([1, 0]), Some(Aes)),
        (p([2, 0]), CipherPrefs::AES_FIRST, Some(ChaCha)),
        // Unknown numbers (a later version's ciphers) are passed over.
        (p([9, 1]), CipherPrefs::CHACHA_FIRST, Some(Aes)),
        (p([1, 0]), p([2, 0]), None),
        (p([0, 0]), CipherPrefs::AES_FIRST, None),
        (p([7, 9]), p([7, 9]), None),
    ];
    for (d, s, want) in cases {
        assert_eq!(choose_cipher(d, s), want, "{d:?} {s:?}");
    }
    assert_eq!(PeerCipher::from_id(Aes.id()), Some(Aes));
    assert_eq!(PeerCipher::from_id(ChaCha.id()), Some(ChaCha));
    assert_eq!(PeerCipher::from_id(0), None);
}

#[test]
fn forced_preferences_negotiate_the_record_cipher() {
    // A switch stands in for the CPU: each pairing links, both sides take the same cipher,
    // and a whole exchange goes through in it.
    use PeerCipher::{Aes128Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    for (d, s, want) in [
        (CipherPrefs::AES_FIRST, CipherPrefs::AES_FIRST, Aes),
        (CipherPrefs::AES_FIRST, CipherPrefs::CHACHA_FIRST, ChaCha),
        (CipherPrefs::CHACHA_FIRST, CipherPrefs::AES_FIRST, ChaCha),
        (CipherPrefs::CHACHA_FIRST, CipherPrefs::CHACHA_FIRST, ChaCha),
    ] {
        let mut pair = linked_with(d, s);
        assert_eq!(pair.d_sealer.cipher(), want);
        assert_eq!(pair.s_sealer.cipher(), want);
        // Message 2 carries the sharer's two preferences: e (32) | encrypted payload (2 + 16).
        assert_eq!(pair.first[6..8], d.to_wire());
        let mut out = Vec::new();
        pair.d_sealer.seal_frame(&mut out, have(9)).unwrap();
        let events = serve_feed(&mut pair.serve, &out).unwrap();
        assert!(matches!(events.as_slice(), [Ev::Frame(f)] if f[..] == [0x83, 0, 0, 0, 9]));
        let block = data(5000);
        let bytes = sharer_bytes(&mut pair, &block);
        let got = fetch_feed(&mut pair.fetch, &bytes, 777, &mut None).unwrap();
        assert!(
            matches!(got.as_slice(), [Got::Msg(_), Got::Msg(_), Got::Block(1, 64, b)] if *b == block),
            "{want:?}: {got:?}"
        );
    }
    // The reply's size: a length, e, and the two preference bytes sealed.
    let mut first = Vec::new();
    let mut fetch = SealedSharerStream::new().with_prefs(CipherPrefs::CHACHA_FIRST);
    fetch
        .start(
            &DOWNLOADER,
            &public_of(&SHARER),
            &handshake_frame(),
            &mut first,
        )
        .unwrap();
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME)
        .with_prefs(CipherPrefs::AES_FIRST);
    let Some(Ev::Hello(hello)) = serve_feed(&mut serve, &first).unwrap().pop() else {
        panic!("no hello");
    };
    assert_eq!(hello.reply.len(), 2 + 32 + 2 + 16);
    assert_eq!(hello.sealer.cipher(), PeerCipher::ChaCha20Poly1305);
}

#[test]
fn a_rewritten_offer_or_no_common_cipher_fails_the_handshake() {
    // The offer travels in clear but is the handshake's prologue: rewritten on the way (to
    // force a cipher), the sharer cannot read message 1.
    let mut first = Vec::new();
    let mut fetch = SealedSharerStream::new().with_prefs(CipherPrefs::AES_FIRST);
    fetch
        .start(
            &DOWNLOADER,
            &public_of(&SHARER),
            &handshake_frame(),
            &mut first,
        )
        .unwrap();
    let mut rewritten = first.clone();
    rewritten[6..8].copy_from_slice(&[2, 0]);
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME)
        .with_prefs(CipherPrefs::CHACHA_FIRST);
    assert!(matches!(
        serve_feed(&mut serve, &rewritten),
        Err(PeerSecureError::Handshake(_))
    ));
    // Nothing in common: the sharer refuses (and answers nothing).
    let mut first = Vec::new();
    let mut fetch = SealedSharerStream::new().with_prefs(CipherPrefs::from_wire([1, 0]));
    fetch
        .start(
            &DOWNLOADER,
            &public_of(&SHARER),
            &handshake_frame(),
            &mut first,
        )
        .unwrap();
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME)
        .with_prefs(CipherPrefs::from_wire([2, 0]));
    assert_eq!(
        serve_feed(&mut serve, &first).err(),
        Some(PeerSecureError::NoCommonCipher {
            downloader: [1, 0],
            sharer: [2, 0]
        })
    );
}

#[test]
fn golden_chacha20_records() {
    // The same layout in ChaCha20-Poly1305, keyed with the direction's whole 32-byte key,
    // pinned byte for byte and checked against RustCrypto's implementation.
    let mut sealer = Sealer::with_cipher(PeerCipher::ChaCha20Poly1305, [0x42; 32]);
    let mut out = Vec::new();
    sealer.seal_frame(&mut out, have(7)).unwrap();
    sealer.seal_block(&mut out, 1, 2, b"abc").unwrap();
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, GOLDEN_CHACHA_RECORDS, "{hex}");
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&[0x42; 32].into());
    let nonce_of = |n: u64| chacha20poly1305::Nonce::from(nonce_bytes(n));
    let mut want = Vec::new();
    for (n, aad, plain, head) in [
        (
            0,
            &9u32.to_be_bytes()[..],
            &[0, 0, 0, 5, 0x83, 0, 0, 0, 7][..],
            true,
        ),
        (
            1,
            &13u32.to_be_bytes()[..],
            &[0, 0, 0, 12, 0x84, 0, 0, 0, 1, 0, 0, 0, 2][..],
            true,
        ),
        (
            2,
            &[0, 0, 0, 12, 0x84, 0, 0, 0, 1, 0, 0, 0, 2][..],
            &b"abc"[..],
            false,
        ),
    ] {
        if head {
            want.extend_from_slice(aad);
        }
        let mut body = plain.to_vec();
        let tag = cipher
            .encrypt_in_place_detached(&nonce_of(n), aad, &mut body)
            .unwrap();
        want.extend_from_slice(&body);
        want.extend_from_slice(&tag);
    }
    assert_eq!(out, want);
    let mut opener = Opener::with_cipher(PeerCipher::ChaCha20Poly1305, [0x42; 32]);
    let mut rec = out[4..13].to_vec();
    let tag: [u8; 16] = out[13..29].try_into().unwrap();
    opener.open(&out[..4], &mut rec, &tag).unwrap();
    assert_eq!(rec, [0, 0, 0, 5, 0x83, 0, 0, 0, 7]);
    // An AES opener cannot read them.
    let mut opener = Opener::new([0x42; 32]);
    let mut rec = out[4..13].to_vec();
    assert_eq!(
        opener.open(&out[..4], &mut rec, &tag),
        Err(PeerSecureError::BadRecord)
    );
}

const GOLDEN_CHACHA_RECORDS: &str = "000000095966e42e9eb433cdeb2cd08a2fc6c501b06949264211076f620000000d8d88a012875a59aea84b17f1437514b06a23736c9020daa781d0e5d8c1a29598a7c2e9484b25232521bdf24885cef72c";

#[test]
fn a_key_stops_at_its_byte_limit() {
    // Both directions count the plaintext their key protected; the message that would pass
    // MAX_KEY_BYTES is refused (nothing appended), and so is everything after it.
    let mut sealer = Sealer::new([0x42; 32]);
    sealer.used = MAX_KEY_BYTES - 9;
    let mut out = Vec::new();
    sealer.seal_frame(&mut out, have(7)).unwrap();
    let first = out.len();
    assert_eq!(
        sealer.seal_frame(&mut out, have(8)),
        Err(PeerSecureError::NonceExhausted)
    );
    assert_eq!(
        sealer.seal_block(&mut out, 1, 0, b"x"),
        Err(PeerSecureError::NonceExhausted)
    );
    assert_eq!(out.len(), first, "a refused record leaves nothing behind");
    let mut opener = Opener::new([0x42; 32]);
    opener.used = MAX_KEY_BYTES - 9;
    let tag: [u8; 16] = out[13..29].try_into().unwrap();
    let mut rec = out[4..13].to_vec();
    opener.open(&out[..4], &mut rec, &tag).unwrap();
    assert_eq!(opener.skip(1), Err(PeerSecureError::NonceExhausted));
    // Data skipped unread counts too.
    let mut opener = Opener::new([0x42; 32]);
    opener.skip(MAX_KEY_BYTES as usize).unwrap();
    assert_eq!(opener.skip(1), Err(PeerSecureError::NonceExhausted));
}

const GOLDEN_RECORDS: &str = "00000009fc17c9a77af5ae95599f9ea381ab239bfbba24e04d8faff3630000000d510d4ad4b0e979ac352a50a775906fd2b46b81c5f239873cb8f034a3a5e8a081b3b7c97f512ac247625311ade9efe7cf";

#[test]
fn the_preamble_and_the_first_message_are_pinned() {
    let mut pair = linked();
    assert_eq!(&pair.first[..8], b"P2PL\x00\x03\x01\x02");
    assert_eq!(
        &preamble(CipherPrefs::CHACHA_FIRST),
        b"P2PL\x00\x03\x02\x01"
    );
    // IK message 1: e (32) | encrypted s (32 + 16) | encrypted payload (+ 16).
    let len = u16::from_be_bytes([pair.first[8], pair.first[9]]) as usize;
    assert_eq!(len, 32 + 48 + handshake_frame().len() + 16);
    assert_eq!(pair.first.len(), 10 + len);
    // Nothing of the payload (the group and file names) is in clear.
    assert!(!pair.first.windows(3).any(|w| w == [0, 1, b'g']));
    let _ = serve_feed(&mut pair.serve, &[]).unwrap();
}

#[test]
fn tampered_records_are_refused() {
    const KEY: [u8; 32] = [0x5e; 32];
    let block = data(1000);
    let reference = {
        let mut out = Vec::new();
        let mut sealer = Sealer::new(KEY);
        sealer.seal_frame(&mut out, accept(3)).unwrap();
        sealer.seal_frame(&mut out, have(2)).unwrap();
        sealer.seal_block(&mut out, 1, 64, &block).unwrap();
        out
    };
    // Layout: accept record, have record, block header record, block data + tag.
    let accept_len = 4 + u32::from_be_bytes(reference[..4].try_into().unwrap()) as usize + 16;
    let have_at = accept_len;
    let head_at = have_at + 4 + 9 + 16;
    let data_at = head_at + 4 + 13 + 16;
    let tag_at = data_at + 1000;
    assert_eq!(reference.len(), tag_at + 16);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a flipped ciphertext byte of a record",
            flip(&reference, have_at + 6),
        ),
        (
            "a flipped tag byte of a record",
            flip(&reference, have_at + 4 + 9 + 3),
        ),
        ("a flipped length byte", flip(&reference, have_at + 3)),
        (
            "a flipped byte of a block's header",
            flip(&reference, head_at + 10),
        ),
        (
            "a flipped ciphertext byte of block data",
            flip(&reference, data_at + 500),
        ),
        (
            "a flipped tag byte of block data",
            flip(&reference, tag_at + 15),
        ),
        ("two records swapped", {
            let mut v = reference[..have_at].to_vec();
            v.extend_from_slice(&reference[head_at..data_at]);
            v.extend_from_slice(&reference[have_at..head_at]);
            v.extend_from_slice(&reference[data_at..]);
            v
        }),
        ("a record dropped", {
            let mut v = reference[..have_at].to_vec();
            v.extend_from_slice(&reference[head_at..]);
            v
        }),
        ("a record replayed", {
            let mut v = reference[..head_at].to_vec();
            v.extend_from_slice(&reference[have_at..head_at]);
            v.extend_from_slice(&reference[head_at..]);
            v
        }),
        ("the first record alone twice", {
            let mut v = reference[..have_at].to_vec();
            v.extend_from_slice(&reference[..have_at]);
            v
        }),
    ];
    for (what, bytes) in cases {
        let mut fetch = SealedSharerStream::open_with(Opener::new(KEY));
        let result = fetch_feed(&mut fetch, &bytes, 4096, &mut None);
        assert!(result.is_err(), "{what}: accepted: {result:?}");
        // And the stream stays failed.
        assert!(fetch.filled(1).is_err(), "{what}");
    }
    // Another key refuses even the untouched bytes; the right one takes them (the cases
    // above fail for what was done to them).
    let mut fetch = SealedSharerStream::open_with(Opener::new([0x5f; 32]));
    assert_eq!(
        fetch_feed(&mut fetch, &reference, 4096, &mut None).err(),
        Some(PeerSecureError::BadRecord)
    );
    let mut fetch = SealedSharerStream::open_with(Opener::new(KEY));
    let got = fetch_feed(&mut fetch, &reference, 4096, &mut None).unwrap();
    assert!(
        matches!(got.as_slice(), [Got::Msg(_), Got::Msg(_), Got::Block(1, 64, b)] if *b == block),
        "{got:?}"
    );
}

/// Feeds `bytes` to the downloader's stream as a downloader that keeps no block (every block
/// an end-game duplicate): each is dropped at its start and checked at its end.
fn fetch_feed_dropping(
    fetch: &mut SealedSharerStream,
    bytes: &[u8],
    step: usize,
) -> Result<Vec<Got>, PeerSecureError> {
    let mut got = Vec::new();
    let mut pos = 0;
    let mut data_bytes = 0;
    loop {
        let in_data = fetch.in_block_data();
        let n = match fetch.next_read() {
            SealedNext::Ready => 0,
            _ if pos == bytes.len() => break,
            SealedNext::Buffer(buf) => {
                let n = buf.len().min(step).min(bytes.len() - pos);
                buf[..n].copy_from_slice(&bytes[pos..pos + n]);
                n
            }
            SealedNext::BlockData { .. } => panic!("a dropped block's data is not the caller's"),
        };
        if in_data {
            data_bytes += n;
        }
        pos += n;
        match fetch.filled(n)? {
            None | Some(SealedDecoded::Established(_)) => {}
            Some(SealedDecoded::Msg(m)) => got.push(Got::Msg(m)),
            Some(SealedDecoded::BlockStart { .. }) => fetch.drop_block()?,
            Some(SealedDecoded::BlockSealed { piece, offset, len }) => {
                // Every byte of its data was read as block data (the link is not stalled).
                assert_eq!(std::mem::take(&mut data_bytes), len as usize);
                assert_eq!(fetch.skip_block()?.0, piece);
                got.push(Got::Block(piece, offset, Vec::new()));
            }
        }
    }
    Ok(got)
}

#[test]
fn a_dropped_block_is_still_authenticated() {
    // An end-game duplicate (or any block the downloader does not keep) is not written, but a
    // tampered one must close the link all the same: its data and tag are read into the
    // stream's buffer and opened there.
    const KEY: [u8; 32] = [0x5e; 32];
    let block = data(1000);
    let mut reference = Vec::new();
    let mut sealer = Sealer::new(KEY);
    sealer.seal_frame(&mut reference, accept(3)).unwrap();
    let block_at = reference.len();
    sealer.seal_block(&mut reference, 1, 64, &block).unwrap();
    sealer.seal_frame(&mut reference, have(2)).unwrap();
    sealer
        .seal_block(&mut reference, 1, 1064, &data(1))
        .unwrap();
    sealer.seal_frame(&mut reference, have(3)).unwrap();
    let data_at = block_at + 4 + 13 + 16;
    let tag_at = data_at + 1000;
    for step in [1, 7, 100, 4096] {
        let mut fetch = SealedSharerStream::open_with(Opener::new(KEY));
        let got = fetch_feed_dropping(&mut fetch, &reference, step).unwrap();
        assert!(
            matches!(
                got.as_slice(),
                [
                    Got::Msg(SharerMsg::Accept { .. }),
                    Got::Block(1, 64, _),
                    Got::Msg(SharerMsg::Have { piece: 2 }),
                    Got::Block(1, 1064, _),
                    Got::Msg(SharerMsg::Have { piece: 3 })
                ]
            ),
            "step {step}: {got:?}"
        );
        for (what, at) in [
            ("a flipped ciphertext byte", data_at),
            ("another", data_at + 999),
            ("a flipped tag byte", tag_at + 7),
        ] {
            let mut fetch = SealedSharerStream::open_with(Opener::new(KEY));
            assert_eq!(
                fetch_feed_dropping(&mut fetch, &flip(&reference, at), step).err(),
                Some(PeerSecureError::BadRecord),
                "step {step}: {what}"
            );
            assert!(fetch.filled(1).is_err(), "the stream stays failed");
        }
    }
    // A block whose data went elsewhere (not dropped at its start) cannot be skipped
    // unchecked.
    let mut fetch = SealedSharerStream::open_with(Opener::new(KEY));
    let mut pos = 0;
    loop {
        let n = match fetch.next_read() {
            SealedNext::Ready => 0,
            SealedNext::Buffer(buf) => {
                let n = buf.len().min(reference.len() - pos);
                buf[..n].copy_from_slice(&reference[pos..pos + n]);
                n
            }
            SealedNext::BlockData { len, .. } => len as usize,
        };
        pos += n;
        if let Some(SealedDecoded::BlockSealed { .. }) = fetch.filled(n).unwrap() {
            break;
        }
    }
    assert!(matches!(
        fetch.skip_block(),
        Err(PeerSecureError::OutOfTurn(_))
    ));
    // And a block cannot be dropped once its data has started.
    let mut fetch = SealedSharerStream::open_with(Opener::new(KEY));
    let head = &reference[..data_at];
    let mut fed = 0;
    loop {
        let n = match fetch.next_read() {
            SealedNext::Buffer(buf) => {
                let n = buf.len().min(head.len() - fed);
                buf[..n].copy_from_slice(&head[fed..fed + n]);
                n
            }
            SealedNext::Ready => 0,
            SealedNext::BlockData { len, .. } => {
                assert_eq!((len, fed), (1000, head.len()));
                break;
            }
        };
        fed += n;
        fetch.filled(n).unwrap();
    }
    fetch.filled(10).unwrap();
    assert!(fetch.drop_block().is_err());
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 0x01;
    v
}

#[test]
fn a_tampered_request_is_refused_by_the_sharer() {
    let mut pair = linked();
    let mut out = Vec::new();
    let request = DownloaderMsg::Request(BlockRef {
        piece: 0,
        offset: 0,
        len: 10,
    });
    pair.d_sealer
        .seal_frame(&mut out, |o| request.emit(o))
        .unwrap();
    pair.d_sealer
        .seal_frame(&mut out, |o| request.emit(o))
        .unwrap();
    let half = out.len() / 2;
    // The second record first: its nonce is not the next one.
    let mut swapped = out[half..].to_vec();
    swapped.extend_from_slice(&out[..half]);
    assert_eq!(
        serve_feed(&mut pair.serve, &swapped).err(),
        Some(PeerSecureError::BadRecord)
    );
    let mut pair = linked();
    let mut out = Vec::new();
    pair.d_sealer
        .seal_frame(&mut out, |o| request.emit(o))
        .unwrap();
    out[6] ^= 0x80;
    assert_eq!(
        serve_feed(&mut pair.serve, &out).err(),
        Some(PeerSecureError::BadRecord)
    );
}

#[test]
fn a_wrong_sharer_key_fails_the_handshake() {
    // The tracker named key B, but the process at the address holds A: it cannot read
    // message 1, and so never answers.
    let mut first = Vec::new();
    let mut fetch = SealedSharerStream::new();
    fetch
        .start(
            &DOWNLOADER,
            &public_of(&[0x33; 32]),
            &handshake_frame(),
            &mut first,
        )
        .unwrap();
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
    assert!(matches!(
        serve_feed(&mut serve, &first),
        Err(PeerSecureError::Handshake(_))
    ));
    // And an answer made by anyone but the holder of the named key does not complete the
    // downloader's handshake: here the real sharer's answer to another downloader's hello.
    let pair = linked();
    let mut other = linked();
    let mut serve2 = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
    let mut events = serve_feed(&mut serve2, &pair.first).unwrap();
    let Some(Ev::Hello(hello)) = events.pop() else {
        panic!()
    };
    let mut fetch = SealedSharerStream::new();
    let mut ignored = Vec::new();
    fetch
        .start(
            &DOWNLOADER,
            &public_of(&SHARER),
            &handshake_frame(),
            &mut ignored,
        )
        .unwrap();
    assert!(matches!(
        fetch_feed(&mut fetch, &hello.reply, 4096, &mut None),
        Err(PeerSecureError::Handshake(_))
    ));
    let _ = serve_feed(&mut other.serve, &[]).unwrap();
}

#[test]
fn a_replayed_handshake_gets_nothing_through() {
    // An eavesdropper recorded a downloader's message 1 and its first request, and replays
    // both to the sharer: message 1 is taken (IK's first message can be replayed), but the
    // keys of the new link need the downloader's private keys, so the replayed request fails
    // its tag and the link closes before anything is served.
    let mut pair = linked();
    let mut request = Vec::new();
    pair.d_sealer
        .seal_frame(&mut request, |o| {
            DownloaderMsg::Request(BlockRef {
                piece: 0,
                offset: 0,
                len: 10,
            })
            .emit(o)
        })
        .unwrap();
    let mut replay = pair.first.clone();
    replay.extend_from_slice(&request);
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
    let result = serve_feed(&mut serve, &replay);
    assert_eq!(result.err(), Some(PeerSecureError::BadRecord));
}

#[test]
fn bad_preambles_and_oversize_messages_are_refused() {
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
    // A plain peer link's first frame.
    assert!(matches!(
        serve_feed(&mut serve, &[0, 0, 1, 0x12, 1, 2]),
        Err(PeerSecureError::BadMagic(_))
    ));
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
    assert_eq!(
        serve_feed(&mut serve, b"P2PL\x00\x04").err(),
        Some(PeerSecureError::BadVersion(4))
    );
    // Versions 1 and 2 (records always in ChaCha20-Poly1305, then always in AES-128-GCM) are
    // not spoken any more: refused as soon as the version is in, not misread.
    for v in [1u8, 2] {
        let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
        assert_eq!(
            serve_feed(&mut serve, &[b'P', b'2', b'P', b'L', 0, v]).err(),
            Some(PeerSecureError::BadVersion(u16::from(v)))
        );
    }
    let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
    let mut bytes = preamble(CipherPrefs::AES_FIRST).to_vec();
    bytes.extend_from_slice(&(MAX_HANDSHAKE_MSG as u16 + 1).to_be_bytes());
    assert_eq!(
        serve_feed(&mut serve, &bytes).err(),
        Some(PeerSecureError::HandshakeTooLong(MAX_HANDSHAKE_MSG + 1))
    );
    // A record over the downloader frame limit is refused at its length prefix.
    let mut pair = linked();
    let too_long = (4 + MAX_DOWNLOADER_FRAME + 1) as u32;
    assert!(matches!(
        serve_feed(&mut pair.serve, &too_long.to_be_bytes()),
        Err(PeerSecureError::RecordTooLong { .. })
    ));
    // And a sharer's record over the largest frame at the downloader.
    let mut pair = linked();
    assert!(matches!(
        fetch_feed(&mut pair.fetch, &u32::MAX.to_be_bytes(), 4096, &mut None),
        Err(PeerSecureError::RecordTooLong { .. })
    ));
    // A payload too long for message 1 is refused before anything is sent.
    let mut out = Vec::new();
    assert_eq!(
        initiate(
            &DOWNLOADER,
            &public_of(&SHARER),
            &[0; MAX_HANDSHAKE_PAYLOAD + 1],
            &mut out,
            CipherPrefs::AES_FIRST
        )
        .err(),
        Some(PeerSecureError::PayloadTooLong(MAX_HANDSHAKE_PAYLOAD + 1))
    );
    assert!(out.is_empty());
}

#[test]
fn two_frames_in_one_record_are_refused() {
    let mut pair = linked();
    let mut out = Vec::new();
    pair.s_sealer
        .seal_frame(&mut out, |o| {
            SharerMsg::accept(Bitfield::full(1)).emit(o);
            SharerMsg::Have { piece: 0 }.emit(o);
        })
        .unwrap();
    assert!(matches!(
        fetch_feed(&mut pair.fetch, &out, 4096, &mut None),
        Err(PeerSecureError::RecordShape(_))
    ));
}

#[test]
fn random_input_never_panics() {
    let mut rng = Rng::new(0x9E_C0_11);
    for round in 0..2000 {
        let len = rng.below(300);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes);
        if round % 2 == 0 && len >= PREAMBLE_LEN {
            bytes[..PREAMBLE_LEN].copy_from_slice(&preamble(CipherPrefs::AES_FIRST));
        }
        let mut serve = SealedDownloaderStream::new(SHARER, MAX_DOWNLOADER_FRAME);
        let _ = serve_feed(&mut serve, &bytes);
        let mut pair = linked();
        let _ = fetch_feed(&mut pair.fetch, &bytes, 1 + rng.below(64), &mut None);
    }
}

#[test]
fn payload_frames_splits_whole_frames_only() {
    let mut payload = handshake_frame();
    payload.extend_from_slice(&[0, 0, 0, 1, 0x12]);
    let frames = payload_frames(&payload).unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1], &[0x12]);
    assert!(payload_frames(&payload[..payload.len() - 1]).is_none());
    assert!(payload_frames(&[0, 0, 0, 0]).is_none());
    assert_eq!(payload_frames(&[]).unwrap().len(), 0);
}

/// Not a correctness test: what each of ring's AEADs costs on this machine for a block of
/// 128 KiB (the engine's block size) sealed and opened in place on one core, for the
/// README's figures. Run with `cargo test --release --lib peer_aead_throughput -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn peer_aead_throughput() {
    use ring::aead::{AES_256_GCM, CHACHA20_POLY1305};
    let block = 128 * 1024;
    let total: usize = 1 << 30;
    for (name, alg) in [
        ("ChaCha20-Poly1305", &CHACHA20_POLY1305),
        ("AES-128-GCM", &AES_128_GCM),
        ("AES-256-GCM", &AES_256_GCM),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32][..alg.key_len()]).unwrap());
        let mut buf = vec![0xa5u8; block];
        let mut tags = Vec::with_capacity(total / block);
        let start = std::time::Instant::now();
        for i in 0..total / block {
            let nonce = Nonce::assume_unique_for_key(nonce_bytes(i as u64));
            tags.push(
                key.seal_in_place_separate_tag(nonce, Aad::from(&[1u8; 13]), &mut buf)
                    .unwrap(),
            );
        }
        let sealed = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        for (i, tag) in tags.iter().enumerate().rev() {
            let nonce = Nonce::assume_unique_for_key(nonce_bytes(i as u64));
            key.open_in_place_separate_tag(nonce, Aad::from(&[1u8; 13]), *tag, &mut buf, 0..)
                .unwrap();
        }
        let opened = start.elapsed().as_secs_f64();
        assert!(buf.iter().all(|&b| b == 0xa5));
        eprintln!(
            "{name}: seal {:.2} GB/s, open {:.2} GB/s ({:.3} / {:.3} s per GiB)",
            total as f64 / sealed / 1e9,
            total as f64 / opened / 1e9,
            sealed,
            opened
        );
    }
}

#[test]
fn small_reads_are_merged_and_never_take_block_data() {
    // A long Accept, blocks back to back, Haves between blocks. The downloader's reads: a
    // block's tag, the next record's length and a block header record come in one read (49
    // bytes), and no read ahead ever takes bytes of block data (they must land in the .part:
    // each block's bytes are only those given for BlockData, checked against the data).
    let mut pair = linked();
    let blocks: Vec<Vec<u8>> = (0..5).map(|i| data(1000 + i * 17)).collect();
    let mut out = Vec::new();
    let s = &mut pair.s_sealer;
    s.seal_frame(&mut out, accept(1000)).unwrap();
    s.seal_block(&mut out, 0, 0, &blocks[0]).unwrap();
    s.seal_block(&mut out, 1, 0, &blocks[1]).unwrap();
    s.seal_block(&mut out, 2, 0, &blocks[2]).unwrap();
    s.seal_frame(&mut out, have(1)).unwrap();
    s.seal_frame(&mut out, have(2)).unwrap();
    s.seal_block(&mut out, 3, 0, &blocks[3]).unwrap();
    s.seal_frame(&mut out, have(3)).unwrap();
    s.seal_block(&mut out, 4, 0, &blocks[4]).unwrap();

    let fetch = &mut pair.fetch;
    let mut pos = 0;
    let mut reads = Vec::new();
    let mut block = Vec::new();
    let mut got = Vec::new();
    loop {
        let n = match fetch.next_read() {
            SealedNext::Ready => 0,
            _ if pos == out.len() => break,
            SealedNext::Buffer(buf) => {
                let n = buf.len().min(out.len() - pos);
                buf[..n].copy_from_slice(&out[pos..pos + n]);
                reads.push(n);
                n
            }
            SealedNext::BlockData { len, .. } => {
                let n = (len as usize).min(out.len() - pos);
                block.extend_from_slice(&out[pos..pos + n]);
                n
            }
        };
        pos += n;
        match fetch.filled(n).unwrap() {
            None | Some(SealedDecoded::BlockStart { .. }) => {}
            Some(SealedDecoded::Msg(SharerMsg::Have { piece })) => {
                got.push(format!("have {piece}"))
            }
            Some(SealedDecoded::Msg(_)) => got.push("accept".into()),
            Some(SealedDecoded::BlockSealed { piece, .. }) => {
                fetch.open_block(&mut block).unwrap();
                assert_eq!(block, blocks[piece as usize], "block {piece}");
                block.clear();
                got.push(format!("block {piece}"));
            }
            Some(SealedDecoded::Established(_)) => panic!("established twice"),
        }
    }
    assert_eq!(
        got,
        [
            "accept", "block 0", "block 1", "block 2", "have 1", "have 2", "block 3", "have 3",
            "block 4"
        ]
    );
    // The long Accept in two reads (its first 33 bytes, the rest); a block header (33); then
    // per block after it one read: tag + header (49), or tag + Have + 4 bytes (49) and the
    // rest up to the end of the next block's header; the last tag alone. One read per
    // record and one per tag (23 reads) before.
    let mut alone = Vec::new();
    Sealer::new([0; 32])
        .seal_frame(&mut alone, accept(1000))
        .unwrap();
    assert!(alone.len() > 64, "the Accept is a long record");
    let accept_rest = alone.len() - 33;
    assert_eq!(
        reads,
        [33, accept_rest, 33, 49, 49, 49, 25 + 33, 49, 29, 16],
        "read sizes"
    );
    assert!(matches!(fetch.next_read(), SealedNext::Buffer(b) if b.len() == 33));
}
