use super::*;
use crate::keys::ServiceKey;

fn key(n: u8) -> PublicKey {
    ServiceKey::from_seed([n; 32]).public_key()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn remembered_keys_survive_a_reload_in_a_private_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut known = KnownTrackers::load(&dir).unwrap();
    assert_eq!(known.get(addr(6000)), None);
    known.remember(addr(6000), key(1)).unwrap();
    known.remember(addr(6001), key(2)).unwrap();
    let again = KnownTrackers::load(&dir).unwrap();
    assert_eq!(again.get(addr(6000)), Some(key(1)));
    assert_eq!(again.get(addr(6001)), Some(key(2)));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(FILE_NAME))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o077, 0, "{dir_mode:o}");
}

#[test]
fn corrupt_or_shared_files_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(FILE_NAME);
    let cases = [
        "127.0.0.1:6000\n",
        "127.0.0.1:6000 ed25519:AAAA\n",
        "nowhere ed25519:AAAA\n",
        &format!("127.0.0.1:6000 {} extra\n", key(1)),
    ];
    for text in cases {
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = KnownTrackers::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }
    std::fs::write(&path, format!("# c\n\n127.0.0.1:6000 {}\n", key(1))).unwrap();
    assert_eq!(
        KnownTrackers::load(tmp.path()).unwrap().get(addr(6000)),
        Some(key(1))
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = KnownTrackers::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("group or others"), "{err}");
}

#[test]
fn lines_win_over_remembered_keys() {
    let mut known = KnownTrackers::in_memory();
    known.remember(addr(6000), key(9)).unwrap();
    known.remember(addr(6002), key(3)).unwrap();
    let line = |port, k: Option<PublicKey>| TrackerLine {
        addr: addr(port),
        key: k,
    };
    // No key on any line: what was remembered for that address, else what was remembered
    // for another tracker of the file (the same service), else first use.
    let keys = TrackerKeys::new(vec![line(6000, None), line(6001, None)], known);
    assert_eq!(
        keys.expected(addr(6000)),
        Some((key(9), KeySource::Remembered(None)))
    );
    assert_eq!(
        keys.expected(addr(6001)),
        Some((key(9), KeySource::RememberedOther(addr(6000), None)))
    );
    let fresh = TrackerKeys::new(
        vec![line(6001, None), line(6004, None)],
        KnownTrackers::in_memory(),
    );
    assert_eq!(fresh.expected(addr(6001)), None);
    assert_eq!(fresh.expected(addr(6004)), None);
    let keys = TrackerKeys::new(vec![line(6000, None), line(6001, None)], keys.known);
    // A key on its own line wins; another line's key binds the lines without one.
    let keys = TrackerKeys::new(vec![line(6000, Some(key(1))), line(6002, None)], keys.known);
    assert_eq!(
        keys.expected(addr(6000)),
        Some((key(1), KeySource::OwnLine))
    );
    assert_eq!(
        keys.expected(addr(6002)),
        Some((key(1), KeySource::OtherLine(addr(6000))))
    );
}

#[test]
fn the_refusal_names_the_tracker_and_both_keys() {
    let msg = TrackerKeys::refusal(addr(6000), key(1), key(2), &KeySource::OwnLine);
    assert!(msg.contains("127.0.0.1:6000"), "{msg}");
    assert!(msg.contains(&key(1).to_string()), "{msg}");
    assert!(msg.contains(&key(2).to_string()), "{msg}");
}

#[test]
fn the_list_stays_bounded() {
    let mut known = KnownTrackers::in_memory();
    for port in 0..(MAX_ENTRIES as u16 + 10) {
        known.remember(addr(port), key(1)).unwrap();
    }
    assert_eq!(known.entries.len(), MAX_ENTRIES);
    assert_eq!(known.get(addr(MAX_ENTRIES as u16 + 9)), Some(key(1)));
}
