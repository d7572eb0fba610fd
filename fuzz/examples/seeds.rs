//! Writes the committed seed corpus, `fuzz/seeds/<target>/<name>`. Files it does not generate
//! (regression inputs saved from crashes) are left alone.
//!
//! Run from `fuzz/`: `cargo run --example seeds`. The seeds are built with the wire types and the
//! data plane's own encoder, so they stay valid as long as the format does; rerun this after a
//! wire-format change. The `control` seeds are the golden scenarios of
//! `control/tests/scenarios/*.scn`, translated to the target's input format.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ramjet_control::{Fact, Input, Machine, Options, Profile, Side, Timestamp, Trigger};
use ramjet_dataplane::internals::codec::{Batch, Encoder, PageCompression};
use ramjet_dataplane::internals::wire::{FrameHeader, Hello, HelloReply, Verdict, frame_capacity};
use ramjet_dataplane::memory::{GuestAddr, GuestMemory, RegionLayout};
use ramjet_dataplane::testkit::image::Rng;
use ramjet_fuzz::control_input::{self, Config, Step};
use ramjet_fuzz::program::{
    self, FLAG_PREFILL, FLAG_URING, LAYOUT, Op, PAGE, PageSpec, program_input,
};

type Seeds = Vec<(String, Vec<u8>)>;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut total = 0;
    for (target, seeds) in [
        ("wire_decode", wire_decode()),
        ("receiver", receiver()),
        ("control", control()),
    ] {
        // Overwrites the generated seeds and keeps any other file (regression inputs).
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("create the seed directory");
        for (name, bytes) in &seeds {
            fs::write(dir.join(name), bytes).expect("write a seed");
            total += bytes.len();
        }
        println!("{target}: {} seeds", seeds.len());
    }
    println!("{total} bytes in {}", root.display());
}

/// A pages frame, region index 0, in round 1, built by the data plane's own encoder from a
/// memory holding zero, text-like and random pages.
fn encoder_frame(compression: PageCompression) -> Vec<u8> {
    let memory = GuestMemory::anonymous(4 * PAGE as u64).expect("memory");
    let text: Vec<u8> = b"ramjet moves guest RAM. "
        .iter()
        .copied()
        .cycle()
        .take(PAGE)
        .collect();
    memory.write(0, PAGE as u64, &text).expect("write");
    let mut random = vec![0u8; PAGE];
    Rng::new(0x9E37_79B9_7F4A_7C15).fill(&mut random);
    memory.write(0, 3 * PAGE as u64, &random).expect("write");
    let offsets = [0u32, 1, 3];
    let batch = Batch {
        region: 0,
        first: 0,
        offsets: &offsets,
        round: 1,
    };
    let mut buf = vec![0u8; frame_capacity(offsets.len())];
    let (len, _) = Encoder::new()
        .encode(&memory, &batch, compression, &mut buf)
        .expect("encode");
    buf.truncate(len);
    buf
}

/// Two rounds over both regions with every encoding, device state in two pieces.
fn valid_ops() -> Vec<Op> {
    vec![
        Op::Pages {
            region: 0,
            first: 0,
            round: 0,
            pages: vec![
                (0, PageSpec::Zero),
                (0, PageSpec::Raw(7)),
                (1, PageSpec::Lz4(5)),
                (0, PageSpec::Raw(0)),
                (0, PageSpec::Zstd(9)),
            ],
        },
        Op::Pages {
            region: 1,
            first: 1,
            round: 0,
            pages: vec![(0, PageSpec::Lz4(200)), (0, PageSpec::Zero)],
        },
        Op::EndOfRound(0),
        Op::Pages {
            region: 0,
            first: 2,
            round: 0,
            pages: vec![(0, PageSpec::Raw(33)), (2, PageSpec::Zero)],
        },
        Op::EndOfRound(0),
        Op::DeviceState(b"cpu0: rip=0xfff0 ".to_vec()),
        Op::DeviceState(b"rtc: 2026-01-01".to_vec()),
        Op::EndOfStream,
    ]
}

fn receiver() -> Seeds {
    let mut seeds = Seeds::new();
    let valid = valid_ops();
    for flags in [0, FLAG_PREFILL, FLAG_URING, FLAG_PREFILL | FLAG_URING] {
        seeds.push((
            format!("program-valid-{flags}"),
            program_input(flags, &valid),
        ));
    }
    // The same stream as raw bytes, for byte-level mutation.
    let raw = program::build_ops(&valid);
    seeds.push(("raw-valid".into(), [&[0u8][..], &raw].concat()));
    seeds.push((
        "raw-valid-prefill".into(),
        [&[FLAG_PREFILL][..], &raw].concat(),
    ));
    // What the real sender's encoder produces: one frame of each flavour, then the end.
    let mut real = encoder_frame(PageCompression::Lz4);
    real.extend(FrameHeader::end_of_round(1, 3));
    real.extend(FrameHeader::device_state(0, b"dev"));
    real.extend(FrameHeader::end_of_stream(1, 3));
    seeds.push((
        "raw-encoder-lz4".into(),
        [&[FLAG_PREFILL][..], &real].concat(),
    ));
    let mut zstd = encoder_frame(PageCompression::Zstd);
    zstd.extend(FrameHeader::end_of_round(1, 3));
    zstd.extend(FrameHeader::end_of_stream(1, 3));
    seeds.push((
        "raw-encoder-zstd".into(),
        [&[FLAG_PREFILL][..], &zstd].concat(),
    ));
    let mut plain = encoder_frame(PageCompression::Off);
    plain.extend(FrameHeader::end_of_round(1, 3));
    plain.extend(FrameHeader::end_of_stream(1, 3));
    seeds.push(("raw-encoder-plain".into(), [&[0u8][..], &plain].concat()));

    // One defect each, on a valid stream.
    let with = |edit: &dyn Fn(&mut Vec<Op>)| {
        let mut ops = valid_ops();
        edit(&mut ops);
        program_input(FLAG_PREFILL, &ops)
    };
    let defects: [(&str, Vec<u8>); 10] = [
        (
            "bad-zstd",
            with(&|ops| {
                ops[1] = Op::Pages {
                    region: 1,
                    first: 0,
                    round: 0,
                    pages: vec![(
                        0,
                        PageSpec::ZstdFrame(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 1, 2]),
                    )],
                };
            }),
        ),
        (
            "bad-lz4",
            with(&|ops| {
                ops[1] = Op::Pages {
                    region: 1,
                    first: 0,
                    round: 0,
                    pages: vec![(0, PageSpec::Lz4Block(vec![0x1f, 0, 1, 2, 3]))],
                };
            }),
        ),
        (
            "twice-in-round",
            with(&|ops| {
                ops.insert(
                    1,
                    Op::Pages {
                        region: 0,
                        first: 1,
                        round: 0,
                        pages: vec![(0, PageSpec::Raw(1))],
                    },
                );
            }),
        ),
        (
            "outside-region",
            with(&|ops| {
                ops[1] = Op::Pages {
                    region: 1,
                    first: 2,
                    round: 0,
                    pages: vec![(0, PageSpec::Zero), (1, PageSpec::Raw(9))],
                };
            }),
        ),
        (
            "wrong-round",
            with(&|ops| {
                ops[3] = Op::Pages {
                    region: 0,
                    first: 0,
                    round: 5,
                    pages: vec![(0, PageSpec::Zero)],
                };
            }),
        ),
        ("bad-count", with(&|ops| ops[2] = Op::EndOfRound(3))),
        ("corrupt", with(&|ops| ops.insert(3, Op::Corrupt(40, 0x40)))),
        (
            "peer-error",
            with(&|ops| ops.insert(2, Op::Error(b"disk full".to_vec()))),
        ),
        ("confirm", with(&|ops| ops.insert(2, Op::Confirm))),
        (
            "near-max-page",
            with(&|ops| {
                ops[0] = Op::Pages {
                    region: 0,
                    first: 0xF0,
                    round: 0,
                    pages: vec![(0, PageSpec::Zero)],
                };
            }),
        ),
    ];
    seeds.extend(defects.into_iter().map(|(n, b)| (n.to_owned(), b)));
    seeds.push((
        "any-header".into(),
        program_input(
            0,
            &[
                Op::Any {
                    kind: 3,
                    round: 0,
                    value: 0,
                    payload: b"x".to_vec(),
                },
                Op::Raw(vec![0; 40]),
            ],
        ),
    ));
    seeds
}

fn wire_decode() -> Seeds {
    let mut seeds = Seeds::new();
    let mut frame = |name: &str, mode: u8, bytes: &[u8]| {
        seeds.push((name.to_owned(), [&[mode][..], bytes].concat()));
    };
    frame("end-of-round", 0, &FrameHeader::end_of_round(2, 100));
    frame("end-of-stream", 0, &FrameHeader::end_of_stream(2, 100));
    frame(
        "device-state",
        0,
        &FrameHeader::device_state(4096, b"piece"),
    );
    frame("error", 0, &FrameHeader::error("disk full"));
    frame("confirm", 0, &FrameHeader::ready(2, 100, 5));
    frame("pages-lz4", 0, &encoder_frame(PageCompression::Lz4));
    frame("pages-zstd", 0, &encoder_frame(PageCompression::Zstd));
    frame("pages-raw", 0, &encoder_frame(PageCompression::Off));
    frame("pages-program", 0, &program::build_ops(&valid_ops()[..1]));
    frame("pages-fix-crc", 4, &program::build_ops(&valid_ops()[1..2]));
    let hello = program::hello();
    frame("hello", 1, &hello);
    frame("hello-fix-crc", 5, &hello);
    let many: Vec<RegionLayout> = (0..5u32)
        .map(|i| RegionLayout::new(i, GuestAddr(u64::from(i) << 32), 1 << 20))
        .collect();
    let wide = Hello {
        flags: Default::default(),
        session: [0xA5; 16],
        channel: 63,
        channels: 64,
        regions: many,
    };
    frame("hello-wide", 1, &wide.encode());
    let accept = HelloReply {
        verdict: Verdict::Accept,
    };
    frame("reply-accept", 2, &accept.encode());
    let refuse = HelloReply {
        verdict: Verdict::Refuse("the memory layouts differ: é".into()),
    };
    frame("reply-refuse", 2, &refuse.encode());
    frame("reply-fix-crc", 6, &refuse.encode());
    frame("all-hello", 3, &hello);
    frame("all-frame", 7, &FrameHeader::ready(1, 1, 1));
    let _ = LAYOUT;
    seeds
}

/// The golden scenarios, as `control` inputs.
fn control() -> Seeds {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/tests/scenarios");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("the control scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "scn"))
        .collect();
    files.sort();
    let mut seeds = Seeds::new();
    for path in files {
        let text = fs::read_to_string(&path).expect("read a scenario");
        let (mut side, mut profile, mut options) = (Side::Source, Profile::Qemu10, Options::new());
        let mut steps = Vec::new();
        let mut machine: Option<Machine> = None;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let spec = line.split("=>").next().unwrap_or("").trim();
            let (word, rest) = spec.split_once(' ').unwrap_or((spec, ""));
            let input: Input = match word {
                "side" if rest == "destination" => {
                    side = Side::Destination;
                    continue;
                }
                "profile" if rest == "qemu-11" => {
                    profile = Profile::Qemu11;
                    continue;
                }
                "option" if rest == "postcopy-ram" => {
                    options = options.postcopy_ram(true);
                    continue;
                }
                "option" if rest == "pause-before-switchover" => {
                    options = options.pause_before_switchover(true);
                    continue;
                }
                "trigger" => Trigger::from_str(rest).expect("a trigger").into(),
                "fact" => Fact::parse(rest).expect("a fact").into(),
                _ => continue,
            };
            let m = machine.get_or_insert_with(|| Machine::new(side, profile, options));
            let due = m.passes() + 1;
            let _ = m.step(input.clone(), Timestamp::EPOCH);
            steps.push(match input {
                Input::Fact(Fact::Pass(n)) if n == due => Step::PassDue,
                other => Step::Input(other),
            });
            if steps.len() % 8 == 0 {
                steps.push(Step::Query);
            }
        }
        let name = path
            .file_stem()
            .map_or_else(|| "scenario".into(), |s| s.to_string_lossy().into_owned());
        seeds.push((
            name,
            control_input::encode(Config::byte(side, profile, options), &steps),
        ));
    }
    // Option changes and statistics around a short migration.
    let steps = [
        Step::SetOptions(Options::new().postcopy_ram(true)),
        Step::Input(Trigger::Migrate.into()),
        Step::Stats(1000),
        Step::SetOptions(Options::new()),
        Step::PassDue,
        Step::Input(Fact::SetupDone.into()),
        Step::Query,
        Step::Input(Fact::Failed(String::new()).into()),
        Step::Input(Fact::Drained.into()),
        Step::Query,
    ];
    seeds.push((
        "options-stats".into(),
        control_input::encode(
            Config::byte(Side::Source, Profile::Qemu11, Options::new()),
            &steps,
        ),
    ));
    seeds
}
