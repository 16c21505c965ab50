//! `vsound ctl`: the host command. Asks the broker's control socket (root or its admin group)
//! for its VMs and streams, or sets a VM's bus volume and mute; the guests with controls see the
//! change. Prints a table, or the broker's JSON with `--json`.

use std::path::PathBuf;

use crate::cli::Action;
use vsound_admin::{Reply, Request, VmStatus};

pub fn run(socket: PathBuf, json: bool, action: Action) -> Result<(), String> {
    let request = match action {
        Action::List => Request::List,
        Action::SetVolume { vm, bus, volume } => {
            let raw = volume.strip_suffix('%').unwrap_or(&volume);
            let volume = raw
                .parse()
                .map_err(|_| format!("volume {volume:?}: give 0..=100"))?;
            Request::SetVolume { vm, bus, volume }
        }
        Action::Mute { vm, bus } => Request::SetMute {
            vm,
            bus,
            mute: true,
        },
        Action::Unmute { vm, bus } => Request::SetMute {
            vm,
            bus,
            mute: false,
        },
        Action::MuteAll { vm } => Request::MuteAll { vm, mute: true },
        Action::UnmuteAll { vm } => Request::MuteAll { vm, mute: false },
    };
    let reply = vsound_admin::request(&socket, &request)?;
    if json {
        println!("{}", vsound_admin::reply_line(&reply).trim_end());
        return match reply {
            Reply::Error(e) => Err(e),
            _ => Ok(()),
        };
    }
    match reply {
        Reply::Vms(vms) => print!("{}", table(&vms)),
        Reply::Done => {}
        Reply::Error(e) => return Err(e),
    }
    Ok(())
}

/// The VMs' streams, one line each.
fn table(vms: &[VmStatus]) -> String {
    let mut rows = vec![[
        "VM", "STREAM", "DIR", "BACKEND", "STATE", "XRUNS", "LATENCY", "VOLUME", "MUTE", "HOST",
    ]
    .map(String::from)];
    for vm in vms {
        for s in &vm.streams {
            rows.push([
                vm.vm.clone(),
                s.name.clone(),
                s.direction.clone(),
                s.backend.clone(),
                s.state.clone(),
                s.xruns.to_string(),
                s.latency_us
                    .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                s.volume.to_string(),
                if s.mute { "yes" } else { "no" }.into(),
                if s.host_present { "there" } else { "gone" }.into(),
            ]);
        }
    }
    if vms.is_empty() {
        return "no VM is connected\n".into();
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            format!("{}\n", line.join("  ").trim_end())
        })
        .collect()
}
