use std::os::unix::fs::PermissionsExt;

use super::*;

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn created_private_then_reloaded_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let a = ClientIdentity::load_or_create(dir.path()).unwrap();
    let path = dir.path().join(IDENTITY_FILE);
    assert_eq!(mode_of(&path), 0o600);
    let b = ClientIdentity::load_or_create(dir.path()).unwrap();
    assert_eq!(a.public(), b.public());
    assert_eq!(a.private(), b.private());
    assert_eq!(a.public(), public_of(&a.private()));
    assert_ne!(a.public(), [0; 32]);
    // The file names the public key for people, never prints the private one elsewhere.
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(&key_text(&a.public())));
    assert!(!format!("{a:?}").contains(&Base64UrlUnpadded::encode_string(&a.private())));
    // Another directory, another identity.
    let other = tempfile::tempdir().unwrap();
    let c = ClientIdentity::load_or_create(other.path()).unwrap();
    assert_ne!(a.public(), c.public());
}

#[test]
fn shared_key_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    ClientIdentity::load_or_create(dir.path()).unwrap();
    let path = dir.path().join(IDENTITY_FILE);
    for mode in [0o640, 0o604, 0o660, 0o644] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = ClientIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Permissions { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("group or others"), "{text}");
    }
}

#[test]
fn corrupt_key_files_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(IDENTITY_FILE);
    let good = ClientIdentity::from_private([7; 32]).file_text();
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"# only a comment\n".to_vec(),
        b"p2pshare-client-key-v1\n".to_vec(),
        b"p2pshare-client-key-v1 short\n".to_vec(),
        b"p2pshare-service-key-v1 BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc\n".to_vec(),
        format!("{good}{good}").into_bytes(),
        vec![0xff, 0xfe, 0x00],
        vec![b'#'; 5000],
    ];
    for bytes in cases {
        fs::write(&path, &bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = ClientIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
    // The good text loads, to the key it holds.
    fs::write(&path, good.as_bytes()).unwrap();
    let loaded = ClientIdentity::load_or_create(dir.path()).unwrap();
    assert_eq!(loaded.private(), [7; 32]);
    // A directory in its place is not a key file.
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    assert!(matches!(
        ClientIdentity::load_or_create(dir.path()),
        Err(IdentityError::Corrupt { .. })
    ));
}

#[test]
fn public_key_is_x25519_of_the_private_one() {
    // RFC 7748, section 6.1: Alice's key pair.
    let private: [u8; 32] = [
        0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66,
        0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9,
        0x2c, 0x2a,
    ];
    let public: [u8; 32] = [
        0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7,
        0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b,
        0x4e, 0x6a,
    ];
    assert_eq!(public_of(&private), public);
}
