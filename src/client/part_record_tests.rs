use super::*;
use crate::testing::fname;

fn meta(size: u64, sha: u8) -> FileMeta {
    let piece_len = 1000;
    let n = FileMeta::n_pieces_for(size, piece_len) as usize;
    FileMeta {
        name: fname("f"),
        size,
        piece_len,
        file_sha1: Sha1Digest([sha; 20]),
        piece_hashes: vec![Sha1Digest([1; 20]); n],
    }
}

/// A `.part` of `m` with its record, pieces `verified` set.
fn ours(target: &Path, m: &FileMeta, verified: &[usize]) -> PartRecord {
    fs::write(part_path(target), vec![0u8; m.size as usize]).unwrap();
    let mut record = PartRecord::new(m, &fs::metadata(part_path(target)).unwrap());
    for &i in verified {
        record.verified.set(i);
    }
    write(target, &record, true).unwrap();
    record
}

#[test]
fn round_trip_and_every_damage_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    let record = ours(&target, &meta(10_500, 7), &[0, 3, 10]);
    let bytes = record.encode();
    assert_eq!(PartRecord::decode(&bytes), Ok(record));
    for len in 0..bytes.len() {
        assert!(PartRecord::decode(&bytes[..len]).is_err(), "prefix {len}");
    }
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(PartRecord::decode(&bad).is_err(), "flip at {i}");
    }
}

#[test]
fn same_content_resumes_with_its_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    let m = meta(10_500, 7);
    ours(&target, &m, &[1, 2]);
    match inspect(&target, &m) {
        Found::Resume { verified } => {
            assert_eq!(verified.iter_ones().collect::<Vec<_>>(), [1, 2]);
        }
        other => panic!("{other:?}"),
    }
    // Rewritten without fsync: read back the same.
    let mut record = PartRecord::new(&m, &fs::metadata(part_path(&target)).unwrap());
    record.verified.set(5);
    write(&target, &record, false).unwrap();
    assert!(matches!(inspect(&target, &m), Found::Resume { verified } if verified.get(5)));
}

#[test]
fn nothing_there_is_a_fresh_download() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(inspect(&tmp.path().join("t"), &meta(10, 1)), Found::Nothing);
}

#[test]
fn other_content_and_foreign_files_are_foreign() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    let m = meta(10_500, 7);
    ours(&target, &m, &[]);
    // Other content: another digest, or another size.
    assert!(
        matches!(inspect(&target, &meta(10_500, 8)), Found::Foreign(r) if r.contains("other content"))
    );
    assert!(matches!(
        inspect(&target, &meta(10_400, 7)),
        Found::Foreign(_)
    ));

    // Someone's own file without a record.
    let own = tmp.path().join("own");
    fs::write(part_path(&own), b"my notes").unwrap();
    assert!(matches!(inspect(&own, &m), Found::Foreign(r) if r.contains("not written")));

    // A `.part` replaced by another file under the record: not the record's file.
    // (The new file exists before the old one goes, so it cannot reuse its inode.)
    let other = tmp.path().join("other");
    fs::write(&other, vec![1u8; m.size as usize]).unwrap();
    fs::rename(&other, part_path(&target)).unwrap();
    assert!(
        matches!(inspect(&target, &m), Found::Foreign(_)),
        "{:?}",
        inspect(&target, &m)
    );

    // A damaged record.
    let t2 = tmp.path().join("t2");
    ours(&t2, &m, &[]);
    fs::write(record_path(&t2), b"P2PPART1 torn").unwrap();
    assert!(matches!(inspect(&t2, &m), Found::Foreign(r) if r.contains("damaged")));

    // A directory named like a `.part`.
    let t3 = tmp.path().join("t3");
    fs::create_dir(part_path(&t3)).unwrap();
    assert!(matches!(inspect(&t3, &m), Found::Foreign(_)));
}

#[test]
fn names_too_long_for_the_suffixes_get_a_short_stem_that_can_be_created() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    // Up to 239 bytes, the suffixes go on the name as it is (the record's temporary file,
    // `.part.resume.tmp`, still fits).
    let fits = dir.path().join("a".repeat(239));
    assert_eq!(
        part_path(&fits),
        dir.path().join(format!("{}.part", "a".repeat(239)))
    );
    let m = meta(3000, 7);
    ours(&fits, &m, &[1]);
    assert!(matches!(inspect(&fits, &m), Found::Resume { .. }));
    // Longer names (up to NAME_MAX) get a stem: both files can be created, distinct names
    // give distinct stems, and the same name always the same.
    for (long, other) in [
        ("n".repeat(240), format!("{}m", "n".repeat(239))),
        ("n".repeat(255), format!("{}m", "n".repeat(254))),
        ("é".repeat(127), format!("{}e", "é".repeat(126))),
    ] {
        let target = dir.path().join(&long);
        let (part, record) = (part_path(&target), record_path(&target));
        assert_eq!(part.parent(), Some(dir.path()));
        assert!(part.file_name().unwrap().len() <= 255);
        assert!(record.file_name().unwrap().len() <= 255);
        assert!(std::str::from_utf8(record.file_name().unwrap().as_bytes()).is_ok());
        let m = meta(3000, 7);
        ours(&target, &m, &[1]);
        assert!(part.exists() && record.exists());
        assert!(
            matches!(inspect(&target, &m), Found::Resume { verified } if verified.get(1)),
            "resumed from the stem's files"
        );
        let other = dir.path().join(other);
        assert_ne!(part_path(&other), part);
        assert_eq!(part_path(&target), part);
    }
}
