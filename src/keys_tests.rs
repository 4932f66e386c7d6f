use super::*;

use std::sync::{Arc, Barrier};

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn create_then_reload_gives_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/service.key");
    let a = ServiceKey::load_or_create(&path).unwrap();
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(mode_of(path.parent().unwrap()), 0o700);
    let b = ServiceKey::load_or_create(&path).unwrap();
    let c = ServiceKey::load(&path).unwrap();
    assert_eq!(a.public_key(), b.public_key());
    assert_eq!(a.tracker_psk(), c.tracker_psk());
    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsString::from("service.key")]);
}

#[test]
fn new_keys_differ() {
    let dir = tempfile::tempdir().unwrap();
    let a = ServiceKey::load_or_create(&dir.path().join("a.key")).unwrap();
    let b = ServiceKey::load_or_create(&dir.path().join("b.key")).unwrap();
    assert_ne!(a.public_key(), b.public_key());
    assert_ne!(a.tracker_psk(), b.tracker_psk());
}

#[test]
fn derived_keys_are_separate_and_stable() {
    let k = ServiceKey::from_seed([3u8; 32]);
    // The PSK is not the signing key's seed, nor the seed itself.
    assert_ne!(k.tracker_psk(), k.signing_key().to_bytes());
    assert_ne!(k.tracker_psk(), [3u8; 32]);
    assert_ne!(k.signing_key().to_bytes(), [3u8; 32]);
    // Pinned: a change of labels or KDF would silently split every existing service.
    let again = ServiceKey::from_seed([3u8; 32]);
    assert_eq!(k.public_key(), again.public_key());
    assert_eq!(
        k.public_key().to_string(),
        "ed25519:caYw7Udx7aESyOZBtTKdZVhBsOweLb7CsjO5aPleIkQ"
    );
    assert_eq!(k.tracker_psk()[..4], [132, 71, 227, 32]);
    // A signature made with the signing key verifies with the public key.
    use ed25519_dalek::{Signer, Verifier};
    let sig = k.signing_key().sign(b"ticket");
    let vk = VerifyingKey::from_bytes(&k.public_key().0).unwrap();
    assert!(vk.verify(b"ticket", &sig).is_ok());
}

#[test]
fn concurrent_creation_yields_one_key() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join(format!("p2pshare/race-{round}.key")));
        let n = 8;
        let barrier = Arc::new(Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let path = Arc::clone(&path);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    ServiceKey::load_or_create(&path).unwrap().public_key()
                })
            })
            .collect();
        let keys: Vec<PublicKey> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        assert_eq!(ServiceKey::load(&path).unwrap().public_key(), keys[0]);
    }
}

#[test]
fn a_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("service.key");
    ServiceKey::load_or_create(&path).unwrap();
    for mode in [0o640, 0o604, 0o660, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = ServiceKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    ServiceKey::load(&path).unwrap();
}

#[test]
fn corrupt_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = ServiceKey::from_seed([5u8; 32]);
    let body = Base64UrlUnpadded::encode_string(&[5u8; 32]);
    let short = Base64UrlUnpadded::encode_string(&[5u8; 31]);
    let long = Base64UrlUnpadded::encode_string(&[5u8; 33]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("comments only", b"# nothing\n".to_vec()),
        ("short", format!("{KEY_FILE_TAG} {short}\n").into_bytes()),
        ("long", format!("{KEY_FILE_TAG} {long}\n").into_bytes()),
        (
            "not base64",
            format!("{KEY_FILE_TAG} {}!\n", &body[1..]).into_bytes(),
        ),
        ("wrong tag", format!("other-key {body}\n").into_bytes()),
        (
            "extra word",
            format!("{KEY_FILE_TAG} {body} x\n").into_bytes(),
        ),
        (
            "two keys",
            format!("{KEY_FILE_TAG} {body}\n{KEY_FILE_TAG} {body}\n").into_bytes(),
        ),
        ("binary", vec![0xff, 0xfe, 0, 1]),
        ("huge", vec![b'#'; 10_000]),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join(format!("{}.key", what.replace(' ', "-")));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(&bytes).unwrap();
        drop(f);
        let err = ServiceKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{what}: {err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        // The corrupt file is left as it was: nothing overwrites a key.
        assert_eq!(fs::read(&path).unwrap(), bytes, "{what}");
    }
    // The file as written loads.
    let path = dir.path().join("good.key");
    good.write_new(&path).unwrap();
    assert_eq!(
        ServiceKey::load(&path).unwrap().public_key(),
        good.public_key()
    );
}

#[test]
fn a_directory_is_not_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = ServiceKey::load_or_create(dir.path()).unwrap_err();
    assert!(matches!(err, KeyError::NotAFile(_)), "{err}");
}

#[test]
fn public_key_text_round_trips() {
    let k = ServiceKey::from_seed([9u8; 32]).public_key();
    let text = k.to_string();
    assert!(text.starts_with("ed25519:"));
    assert_eq!(text.len(), "ed25519:".len() + 43);
    assert_eq!(text.parse::<PublicKey>().unwrap(), k);
    assert!("ed25519:".parse::<PublicKey>().is_err());
    assert!(text[1..].parse::<PublicKey>().is_err());
    assert!(format!("{text}A").parse::<PublicKey>().is_err());
    assert!(text
        .replace("ed25519:", "ed448:")
        .parse::<PublicKey>()
        .is_err());
    assert!(format!("ed25519:{}", &text[9..])
        .parse::<PublicKey>()
        .is_err());
}

#[test]
fn key_file_name_depends_on_the_address_set_only() {
    let a: SocketAddr = "127.0.0.1:6000".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:6001".parse().unwrap();
    let c: SocketAddr = "127.0.0.1:6002".parse().unwrap();
    let name = key_file_name(&[a, b]);
    assert!(
        name.starts_with("service-") && name.ends_with(".key"),
        "{name}"
    );
    assert_eq!(name.len(), "service-".len() + 16 + ".key".len());
    assert_eq!(name, key_file_name(&[b, a]));
    assert_ne!(name, key_file_name(&[a, c]));
    assert_ne!(name, key_file_name(&[a]));
}

#[test]
fn state_root_follows_xdg_then_home() {
    let some = |s: &str| Some(OsString::from(s));
    assert_eq!(
        state_root(some("/x/state"), some("/home/u")),
        Some(PathBuf::from("/x/state/p2pshare"))
    );
    assert_eq!(
        state_root(None, some("/home/u")),
        Some(PathBuf::from("/home/u/.local/state/p2pshare"))
    );
    // A relative or empty XDG_STATE_HOME is ignored, as the XDG spec says.
    assert_eq!(
        state_root(some("rel"), some("/home/u")),
        Some(PathBuf::from("/home/u/.local/state/p2pshare"))
    );
    assert_eq!(
        state_root(some(""), some("/home/u")),
        Some(PathBuf::from("/home/u/.local/state/p2pshare"))
    );
    assert_eq!(state_root(None, None), None);
}

#[test]
fn client_link_certificate_is_pinned_and_verifies() {
    let key = ServiceKey::from_seed([3u8; 32]);
    let (private, public) = key.client_link_static();
    // Derived keys are part of the protocol: every tracker of a service must agree on them
    // and a change would break every client's trust; pin them.
    assert_eq!(private, key.client_link_static().0);
    assert_ne!(private, key.tracker_psk());
    assert_eq!(
        Base64UrlUnpadded::encode_string(&public),
        "ybj8E6EOOKxQ_qmVHhyIuLdlmBbVq958CzfHjQO55SU"
    );
    let cert = key.client_link_certificate();
    assert_eq!(cert.len(), CERT_LEN);
    assert_eq!(&cert[..32], &key.public_key().0);
    assert_eq!(verify_static_cert(&cert, &public), Ok(key.public_key().0));
    // Ed25519 signatures are deterministic: the certificate is too.
    assert_eq!(cert, key.client_link_certificate());
    let other = ServiceKey::from_seed([4u8; 32]).client_link_static().1;
    assert!(verify_static_cert(&cert, &other).is_err());
    assert!(verify_static_cert(&cert[..95], &public).is_err());
    assert!(verify_static_cert(&cert, &public[..31]).is_err());
    let mut bad = cert.clone();
    bad[0] ^= 1;
    assert!(verify_static_cert(&bad, &public).is_err());
}

fn ticket_body(expires: u64) -> crate::wire::ticket::TicketBody {
    crate::wire::ticket::TicketBody {
        expires,
        file_sha1: crate::wire::Sha1Digest([0xab; 20]),
        group: crate::wire::GroupId::new("g1").unwrap(),
        user: crate::wire::UserId::new("bob").unwrap(),
        client_key: [7; 32],
    }
}

#[test]
fn tickets_verify_offline_and_only_as_issued() {
    use crate::wire::{GroupId, Sha1Digest};
    let service = ServiceKey::from_seed([1u8; 32]);
    let public = service.public_key();
    let ticket = service.sign_ticket(ticket_body(1_800_000_000));
    // Golden: Ed25519 signatures are deterministic, so the signed ticket's bytes are fixed.
    assert_eq!(
        Base64UrlUnpadded::encode_string(&ticket.signature),
        "8-IZ73__mB7NyX5Kvvr5wkUvSB0qRJHoMV0yR7Tg6gPC-EwGymOut2OlvQImmVZSYihFjZXvhGFygeUpWQoKDg"
    );
    let g1 = GroupId::new("g1").unwrap();
    let file = Sha1Digest([0xab; 20]);
    assert_eq!(
        verify_ticket(&public, &ticket, &g1, &file, 1_799_999_999),
        Ok(())
    );
    // Expired: at and after its expiry (a former member's old ticket).
    for now in [1_800_000_000, 1_900_000_000] {
        assert!(matches!(
            verify_ticket(&public, &ticket, &g1, &file, now),
            Err(TicketError::Expired { .. })
        ));
    }
    // For another group or other content.
    let g2 = GroupId::new("g2").unwrap();
    assert_eq!(
        verify_ticket(&public, &ticket, &g2, &file, 0),
        Err(TicketError::WrongGroup)
    );
    assert_eq!(
        verify_ticket(&public, &ticket, &g1, &Sha1Digest([0xac; 20]), 0),
        Err(TicketError::WrongFile)
    );
    // Another service's key.
    let other = ServiceKey::from_seed([2u8; 32]).public_key();
    assert_eq!(
        verify_ticket(&other, &ticket, &g1, &file, 0),
        Err(TicketError::BadSignature)
    );
    // Forged: any field changed after signing (a later expiry, another group, user or
    // client), or a flipped bit of the signature.
    let mut later = ticket.clone();
    later.body.expires += 3600;
    let mut regrouped = ticket.clone();
    regrouped.body.group = g2.clone();
    let mut other_user = ticket.clone();
    other_user.body.user = crate::wire::UserId::new("mallory").unwrap();
    let mut other_client = ticket.clone();
    other_client.body.client_key[0] ^= 1;
    let mut bad_sig = ticket.clone();
    bad_sig.signature[10] ^= 1;
    for forged in [&later, &other_user, &other_client, &bad_sig] {
        assert_eq!(
            verify_ticket(&public, forged, &g1, &file, 0),
            Err(TicketError::BadSignature),
            "{forged:?}"
        );
    }
    assert_eq!(
        verify_ticket(&public, &regrouped, &g2, &file, 0),
        Err(TicketError::BadSignature)
    );
    // A ticket is not a certificate: the same key's certificate signature does not verify as
    // a ticket, and the other way round (distinct contexts).
    let cert = service.client_link_certificate();
    let mut as_ticket = ticket.clone();
    as_ticket.signature.copy_from_slice(&cert[32..]);
    assert_eq!(
        verify_ticket(&public, &as_ticket, &g1, &file, 0),
        Err(TicketError::BadSignature)
    );
}

fn places_in(dir: &Path) -> DefaultKeyPlaces {
    let a: SocketAddr = "127.0.0.1:7001".parse().unwrap();
    DefaultKeyPlaces::new(
        &dir.join("files/tracker_info.txt"),
        &[a],
        Some(dir.join("home/p2pshare")),
    )
}

#[test]
fn the_default_key_is_made_beside_the_tracker_file_with_a_copy_in_the_state_home() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("files")).unwrap();
    let places = places_in(dir.path());
    assert_eq!(
        places.beside_file,
        dir.path().join("files").join(format!(
            ".p2pshare-{}",
            key_file_name(&["127.0.0.1:7001".parse().unwrap()])
        ))
    );
    assert!(places.find().unwrap().is_none());
    let (key, path) = places.find_or_create().unwrap();
    assert_eq!(path, places.beside_file);
    let home = places.state_home.clone().unwrap();
    assert_eq!(mode_of(&places.beside_file), 0o600);
    assert_eq!(mode_of(&home), 0o600);
    assert_eq!(
        ServiceKey::load(&home).unwrap().public_key(),
        key.public_key()
    );
    // Found again, beside the file first.
    let (again, path) = places.find().unwrap().unwrap();
    assert_eq!(
        (again.public_key(), path),
        (key.public_key(), places.beside_file.clone())
    );
}

#[test]
fn a_key_in_the_state_home_only_is_found_there() {
    // Keys made by earlier builds, or for a copy of the tracker file elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let places = places_in(dir.path());
    let home = places.state_home.clone().unwrap();
    let made = ServiceKey::load_or_create(&home).unwrap();
    let (found, path) = places.find_or_create().unwrap();
    assert_eq!((found.public_key(), path), (made.public_key(), home));
    assert!(
        fs::symlink_metadata(&places.beside_file).is_err(),
        "no second key made"
    );
}

#[test]
fn a_bad_key_beside_the_file_is_an_error_not_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("files")).unwrap();
    let places = places_in(dir.path());
    ServiceKey::load_or_create(places.state_home.as_ref().unwrap()).unwrap();
    fs::write(&places.beside_file, "garbage\n").unwrap();
    fs::set_permissions(&places.beside_file, fs::Permissions::from_mode(0o600)).unwrap();
    let err = places.find_or_create().unwrap_err();
    assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(".p2pshare-service-"), "{err}");
}

#[test]
fn a_key_file_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("service.key");
    ServiceKey::load_or_create(&path).unwrap();
    // Only root can give a file away; elsewhere there is nothing to test.
    if std::os::unix::fs::chown(&path, Some(4242), None).is_err() {
        eprintln!("skipped: cannot chown (not root)");
        return;
    }
    let err = ServiceKey::load(&path).unwrap_err();
    assert!(
        matches!(err, KeyError::NotOurs { owner: 4242, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("belongs to user 4242"), "{err}");
}

#[test]
fn a_symlink_is_not_followed_to_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.key");
    ServiceKey::load_or_create(&real).unwrap();
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = ServiceKey::load(&link).unwrap_err();
    assert!(matches!(err, KeyError::Io { .. }), "{err}");
}

#[test]
fn a_tracker_file_in_a_directory_others_can_change_keeps_its_key_in_the_state_home() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    fs::create_dir(&files).unwrap();
    fs::set_permissions(&files, fs::Permissions::from_mode(0o777)).unwrap();
    let places = places_in(dir.path());
    // Someone else's key planted there is never looked at.
    fs::write(&places.beside_file, "planted\n").unwrap();
    let (key, path) = places.find_or_create().unwrap();
    assert_eq!(Some(&path), places.state_home.as_ref());
    assert_eq!(
        ServiceKey::load(&path).unwrap().public_key(),
        key.public_key()
    );
    // Sticky, as /tmp is: safe again (entries cannot be replaced by others).
    fs::remove_file(&places.beside_file).unwrap();
    fs::set_permissions(&files, fs::Permissions::from_mode(0o1777)).unwrap();
    let (_, path) = places.find_or_create().unwrap();
    assert_eq!(
        Some(&path),
        places.state_home.as_ref(),
        "found in the state home first"
    );
    assert!(places.beside_file_is_safe());
}
