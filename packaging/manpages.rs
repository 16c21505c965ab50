//! Writes the man pages of the three programs, generated from their clap definitions (the same
//! `Args` the binaries parse) with clap_mangen: `vsound-worker.1`, `vsound-broker.1`, and
//! `vsound.1` with one page for each of its subcommands (`vsound-run.1`, `vsound-ctl.1`,
//! `vsound-ctl-list.1`, ...), which `vsound.1`'s SUBCOMMANDS section names.
//!
//!     cargo run --example manpages -- DIR [--date YYYY-MM-DD]
//!
//! `scripts/package.sh` runs it and cargo-deb gzips the pages into /usr/share/man/man1. An
//! example of the root package, so that neither clap_mangen nor this code is linked into a
//! shipped binary (the worker above all stays minimal).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

// The launcher's command line: the file the `vsound` binary itself includes (it has no library).
#[path = "../src/launcher/cli.rs"]
#[allow(dead_code)]
mod cli;

/// The FILES and SEE ALSO sections of the three programs' pages: where the rest is.
fn files_and_see_also(page: &str) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/vsound/vsound.toml",
            "The configuration the broker and every worker read (the shipped units pass it with \
             --config). An empty file is the built-in default.",
        ),
        ("/usr/share/doc/vsound/examples/", "Example configurations."),
        (
            "/lib/systemd/system/vsound-*",
            "The socket-activated units: vsound-broker.socket, vsound-broker-control.socket and \
             vsound-broker.service; vsound-worker@.socket and vsound-worker@.service, one \
             instance per VM. The package enables none of them.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(path)]);
        roff.text([roman(what)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    for name in ["vsound", "vsound-broker", "vsound-worker"] {
        if name != page {
            refs.push(bold(name));
            refs.push(roman("(1), "));
        }
    }
    refs.push(bold("systemd.socket"));
    refs.push(roman(
        "(5); /usr/share/doc/vsound/README.md (design, configuration, deployment) and \
         /usr/share/doc/vsound/SECURITY.md (the threat model and the sandbox).",
    ));
    roff.text(refs);
    roff
}

/// A subcommand page's SEE ALSO: the pages of the commands above it.
fn see_parents(parents: &[String]) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    for (i, name) in parents.iter().enumerate() {
        refs.push(bold(name.as_str()));
        refs.push(roman(if i + 1 < parents.len() {
            "(1), "
        } else {
            "(1)"
        }));
    }
    roff.text(refs);
    roff
}

/// The pages' date when none is given: SOURCE_DATE_EPOCH's (reproducible builds), else today's,
/// as YYYY-MM-DD in UTC.
fn default_date() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let days = i64::try_from(seconds / 86_400).unwrap_or(0) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Where the pages go, and the date they carry.
struct Output {
    dir: PathBuf,
    date: String,
}

/// Writes `cmd`'s page into `out.dir`, then (as clap_mangen's `generate_to` does) one page for each
/// of its subcommands. `parents` are the pages of the commands above it.
fn write_pages(
    cmd: &clap::Command,
    parents: &[String],
    out: &Output,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    // Every page, subcommands' too, says the release it documents (clap_mangen's default
    // would be the subcommand's name).
    let man = Man::new(cmd.clone())
        .date(out.date.as_str())
        .source(format!("vsound {}", env!("CARGO_PKG_VERSION")))
        .manual("vsound");
    let path = out.dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    if parents.is_empty() {
        files_and_see_also(name).to_writer(&mut page)?;
    } else {
        see_parents(parents).to_writer(&mut page)?;
    }
    std::fs::File::create(&path)?.write_all(&page)?;
    written.push(path);
    let mut chain = parents.to_vec();
    chain.push(name.to_string());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, &chain, out, written)?;
    }
    Ok(())
}

const USAGE: &str = "usage: cargo run --example manpages -- DIR [--date YYYY-MM-DD]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.as_slice() {
        [dir] => Output {
            dir: dir.into(),
            date: default_date(),
        },
        [dir, flag, date] if flag == "--date" => Output {
            dir: dir.into(),
            date: date.clone(),
        },
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let commands = [
        vsound_worker::cli::Args::command(),
        vsound_broker::cli::Args::command(),
        cli::Args::command(),
    ];
    let mut written = Vec::new();
    let result = std::fs::create_dir_all(&out.dir).and_then(|()| {
        commands.into_iter().try_for_each(|cmd| {
            // Subcommand pages are named PARENT-SUB and their synopses `PARENT SUB` once built;
            // the `help` subcommand gets no page.
            let mut cmd = cmd.disable_help_subcommand(true);
            cmd.build();
            write_pages(&cmd, &[], &out, &mut written)
        })
    });
    if let Err(e) = result {
        eprintln!("manpages: {}: {e}", out.dir.display());
        return ExitCode::FAILURE;
    }
    for path in written {
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}
