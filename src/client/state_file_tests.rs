use super::*;
use crate::testing::{fname, gid, uid};
use crate::wire::Sha1Digest;

fn meta(name: &str, size: u64) -> FileMeta {
    let n = FileMeta::n_pieces_for(size, 512 * 1024) as usize;
    FileMeta {
        name: fname(name),
        size,
        piece_len: 512 * 1024,
        file_sha1: Sha1Digest([7; 20]),
        piece_hashes: (0..n).map(|i| Sha1Digest([i as u8; 20])).collect(),
    }
}

fn sample() -> ClientState {
    let mut state = ClientState::default();
    state.users.insert(
        uid("alice"),
        UserState {
            shares: vec![
                SavedShare {
                    group: gid("g1"),
                    path: PathBuf::from("/home/a/my file.bin"),
                    stamp: Some(FileStamp {
                        size: 1_500_000,
                        mtime_secs: -3,
                        mtime_nanos: 999_999_999,
                    }),
                    meta: meta("my file.bin", 1_500_000),
                },
                SavedShare {
                    group: gid("g2"),
                    path: PathBuf::from("/x/empty"),
                    stamp: None,
                    meta: meta("empty", 0),
                },
            ],
            downloads: vec![SavedDownload {
                group: gid("g1"),
                name: fname("big.iso"),
                target: PathBuf::from("/d/big.iso"),
            }],
        },
    );
    state.users.insert(uid("bob"), UserState::default());
    state
}

#[test]
fn round_trip() {
    let state = sample();
    assert_eq!(decode(&encode(&state)).unwrap(), state);
    let empty = ClientState::default();
    assert_eq!(decode(&encode(&empty)).unwrap(), empty);
}

#[test]
fn torn_write_at_every_offset_is_detected() {
    let bytes = encode(&sample());
    for len in 0..bytes.len() {
        assert!(
            decode(&bytes[..len]).is_err(),
            "prefix of {len} bytes accepted"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(decode(&longer).is_err());
}

#[test]
fn corrupt_content_is_an_error_not_a_panic() {
    let bytes = encode(&sample());
    // Every single flipped byte is caught (magic, length or checksum).
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x41;
        assert!(decode(&bad).is_err(), "flip at {i} accepted");
    }
    // A well-formed frame around a malformed body (checksum right) is refused too.
    let body = [0u8, 0, 0, 1, 0, 0];
    let mut forged = MAGIC.to_vec();
    put_u32(&mut forged, body.len() as u32);
    forged.extend_from_slice(&body);
    put_u32(&mut forged, crc32c::crc32c(&body));
    assert!(decode(&forged).is_err());
    // Random bytes.
    let mut rng = crate::rng::SplitMix64::new(13);
    for _ in 0..2000 {
        let len = (rng.next_u64() % 200) as usize;
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let _ = decode(&junk);
    }
}

#[test]
fn save_and_load_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert_eq!(load(dir).unwrap(), ClientState::default());
    save(dir, &sample()).unwrap();
    assert_eq!(load(dir).unwrap(), sample());
    assert!(!dir.join("state.tmp").exists());
    // A torn temporary file left by a crash changes nothing.
    fs::write(dir.join("state.tmp"), &encode(&sample())[..10]).unwrap();
    assert_eq!(load(dir).unwrap(), sample());
    save(dir, &ClientState::default()).unwrap();
    assert_eq!(load(dir).unwrap(), ClientState::default());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}

#[test]
fn corrupt_file_names_itself_and_is_set_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(dir.join(STATE_FILE), b"garbage").unwrap();
    let err = load(dir).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, LoadError::Corrupt { .. }), "{err:?}");
    assert!(
        text.contains(&dir.join(STATE_FILE).display().to_string()),
        "{text}"
    );
    let bad = set_aside(dir).unwrap();
    assert_eq!(fs::read(bad).unwrap(), b"garbage");
    assert_eq!(load(dir).unwrap(), ClientState::default());
}

#[test]
fn lock_keeps_a_second_holder_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("client-x");
    let first = StateLock::acquire(&dir).unwrap();
    let err = StateLock::acquire(&dir).unwrap_err();
    assert!(matches!(err, LockError::Held { .. }), "{err:?}");
    assert!(
        err.to_string().contains("held by another running client"),
        "{err}"
    );
    drop(first);
    StateLock::acquire(&dir).unwrap();
}

#[test]
fn stamps_follow_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f");
    fs::write(&path, b"abc").unwrap();
    let a = FileStamp::read(&path).unwrap();
    assert_eq!(a.size, 3);
    fs::write(&path, b"abcd").unwrap();
    assert_ne!(FileStamp::read(&path).unwrap(), a);
}
