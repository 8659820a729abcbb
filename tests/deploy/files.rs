//! The deployment files agree with each other and with the code: the unit, the sysusers and
//! tmpfiles entries, the Debian package's assets (Cargo.toml), the example config, the exit
//! codes, and the README's "Install as a service", which names only paths the package or the
//! unit creates.

use std::collections::BTreeSet;
use std::path::Path;

use carpulse::config;
use carpulse::exit;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `Key=value` of the unit, in order (keys repeat).
fn unit() -> Vec<(String, String)> {
    read("systemd/carpulse.service")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn values(key: &str) -> Vec<String> {
    unit()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

fn one(key: &str) -> String {
    let v = values(key);
    assert_eq!(v.len(), 1, "{key}: {v:?}");
    v[0].clone()
}

/// (source, destination) of every asset of the Debian package.
fn deb_assets() -> Vec<(String, String)> {
    let cargo: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    cargo["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_unit_matches_the_code_and_the_package() {
    // Exit codes the code gives for permanent failures are the ones never restarted.
    let codes: BTreeSet<u8> = one("RestartPreventExitStatus")
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(
        codes,
        BTreeSet::from([exit::EX_CONFIG, exit::EX_CANTCREAT, exit::EX_UNAVAILABLE])
    );
    assert_eq!(one("Type"), "notify");
    // Enough descriptors for poll.max_in_flight requests plus the capped metrics listener.
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 1024 + carpulse::daemon::metrics::CONNECTIONS_MAX as u64 + 256,
        "LimitNOFILE={nofile}"
    );
    assert!(!one("WatchdogSec").is_empty());
    assert!(
        !values("ProcSubset").iter().any(|v| v == "pid"),
        "ProcSubset=pid hides /proc/stat"
    );
    assert!(values("DynamicUser").is_empty() || one("DynamicUser") == "no");
    assert_eq!(one("User"), "carpulse");
    assert_eq!(one("Group"), "carpulse");
    assert_eq!(one("UMask"), "0027");
    assert_eq!(one("StateDirectory"), "carpulse");
    assert_eq!(one("ConfigurationDirectory"), "carpulse");

    // ExecStart runs the packaged binary on the default config path.
    let exec = one("ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        argv,
        [
            "/usr/bin/carpulse",
            "--config",
            config::DEFAULT_CONFIG_PATH,
            "run"
        ]
    );
    let assets = deb_assets();
    assert!(assets
        .iter()
        .any(|(s, d)| s == "target/release/carpulse" && d == "usr/bin/"));
    assert!(assets
        .iter()
        .any(|(_, d)| format!("/{d}") == config::DEFAULT_CONFIG_PATH));

    // The credentials are the ones the config reads, from the files the example names.
    let loaded: Vec<(String, String)> = values("LoadCredential")
        .iter()
        .map(|v| {
            let (id, path) = v.split_once(':').unwrap();
            (id.to_string(), path.to_string())
        })
        .collect();
    let ids: BTreeSet<&str> = loaded.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            config::CREDENTIAL_CLIENT_SECRET,
            config::CREDENTIAL_API_CLIENT_SECRET
        ])
    );
    let defaults: BTreeSet<String> = values("SetCredential")
        .iter()
        .map(|v| v.split_once(':').unwrap().0.to_string())
        .collect();
    assert_eq!(
        defaults.len(),
        2,
        "each credential has a default for an absent file"
    );
    let example = read("config/carpulse.example.toml");
    let client = &loaded
        .iter()
        .find(|(id, _)| id == config::CREDENTIAL_CLIENT_SECRET)
        .unwrap()
        .1;
    assert!(
        example.contains(&format!("client_secret_file = \"{client}\"")),
        "the example reads the same file the unit loads"
    );

    // The store lives in the state directory, which tmpfiles and the unit both make 0750.
    assert!(config::DEFAULT_STORE_PATH.starts_with("/var/lib/carpulse/"));
    assert_eq!(one("StateDirectoryMode"), "0750");
}

#[test]
fn sysusers_and_tmpfiles_make_what_the_unit_and_the_store_need() {
    let sysusers = read("systemd/carpulse.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", "carpulse"])),
        "{sysusers}"
    );
    let tmpfiles = read("systemd/carpulse.tmpfiles");
    let entries: Vec<Vec<&str>> = tmpfiles
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let entry = |path: &str| {
        entries
            .iter()
            .find(|e| e[1] == path)
            .unwrap_or_else(|| panic!("no tmpfiles entry for {path}"))
            .clone()
    };
    assert_eq!(
        entry("/var/lib/carpulse")[2..5],
        ["0750", "carpulse", "carpulse"]
    );
    assert_eq!(entry("/etc/carpulse")[2..5], ["0750", "root", "carpulse"]);
    assert_eq!(
        entry("/etc/carpulse/carpulse.toml")[2..5],
        ["0640", "root", "carpulse"]
    );
    // Secrets: never readable by the group (Grafana is in it).
    for secret in [
        "/etc/carpulse/client_secret",
        "/etc/carpulse/api_client_secret",
    ] {
        assert_eq!(entry(secret)[2], "0600", "{secret}");
    }
    let backups = entry("/var/lib/carpulse/backups");
    assert_eq!(backups[2..5], ["0750", "carpulse", "carpulse"]);
    let example = read("config/carpulse.example.toml");
    assert!(example.contains("dir = \"/var/lib/carpulse/backups\""));
    // cargo-deb packages the unit and carpulse.sysusers from systemd/ (its unit-scripts) and
    // adds the sysusers snippet; tmpfiles is an asset, applied by the postinst after it.
    assert!(deb_assets()
        .iter()
        .any(|(s, d)| s == "systemd/carpulse.tmpfiles" && d == "usr/lib/tmpfiles.d/carpulse.conf"));
    let cargo: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let units = &cargo["package"]["metadata"]["deb"]["systemd-units"];
    assert_eq!(units["unit-name"].as_str(), Some("carpulse"));
    assert_eq!(units["unit-scripts"].as_str(), Some("systemd/"));
    assert_eq!(
        units["enable"].as_bool(),
        Some(false),
        "installed, not enabled"
    );
    assert_eq!(
        units["start"].as_bool(),
        Some(false),
        "installed, not started"
    );
    let postinst = read("debian/postinst");
    let marker = postinst
        .find("\n#DEBHELPER#\n")
        .expect("the cargo-deb marker on its own line");
    assert_eq!(
        postinst.matches("#DEBHELPER#").count(),
        1,
        "cargo-deb fills every marker"
    );
    assert!(postinst[marker..].contains("systemd-tmpfiles --create carpulse.conf"));
}

/// Every absolute path the README's "Install as a service" section names is one the package
/// installs, tmpfiles or the unit creates, or carpulse writes.
#[test]
fn the_readme_install_steps_name_only_files_that_exist() {
    let readme = read("README.md");
    let start = readme
        .find("## Install as a service")
        .expect("README has an \"Install as a service\" section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let section = &section[..end];
    let mut known: BTreeSet<String> = deb_assets()
        .iter()
        .map(|(src, d)| {
            if d.ends_with('/') {
                format!(
                    "/{d}{}",
                    Path::new(src).file_name().unwrap().to_string_lossy()
                )
            } else {
                format!("/{d}")
            }
        })
        .collect();
    for installed in [
        "/usr/lib/systemd/system/carpulse.service",
        "/usr/lib/sysusers.d/carpulse.conf",
        "/usr/lib/tmpfiles.d/carpulse.conf",
    ] {
        known.insert(installed.into());
    }
    for line in read("systemd/carpulse.tmpfiles").lines() {
        if let Some(path) = line
            .split_whitespace()
            .nth(1)
            .filter(|p| p.starts_with('/'))
        {
            known.insert(path.to_string());
        }
    }
    for store in [
        "/var/lib/carpulse/carpulse.db",
        "/var/lib/carpulse/carpulse.tokens.db",
    ] {
        known.insert(store.into());
    }
    let named: BTreeSet<String> = section
        .split(|c: char| c.is_whitespace() || "`\"'(),:;[]".contains(c))
        .filter(|w| {
            [
                "/etc/carpulse",
                "/var/lib/carpulse",
                "/usr/",
                "/lib/systemd",
            ]
            .iter()
            .any(|p| w.starts_with(p))
        })
        .map(|w| w.trim_end_matches('.').to_string())
        .collect();
    assert!(!named.is_empty());
    let unknown: Vec<&String> = named
        .iter()
        .filter(|p| !known.contains(*p) && !known.iter().any(|k| k.starts_with(&format!("{p}/"))))
        .collect();
    assert!(
        unknown.is_empty(),
        "the README names {unknown:?}, which nothing installs"
    );
    for step in [
        "systemctl enable --now carpulse",
        "sudo -u carpulse carpulse connect",
        "usermod -aG carpulse grafana",
        "cargo deb --profile dist",
    ] {
        assert!(section.contains(step), "the install steps say {step:?}");
    }
}
