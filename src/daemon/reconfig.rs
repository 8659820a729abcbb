//! SIGHUP re-reads the config file (issue: reload config without a restart). What a running
//! daemon can take on is applied: the schedule, `[poll]`, `[budget]`, the refresh margin,
//! `metrics.stale_after` and `schedule.discover_every`. Where Smartcar is, who carpulse is to
//! it, and where the store and listener are, need a restart: those changes are named in the
//! log and left alone, so a half-edited file never moves a running daemon to another account.

use crate::config::Config;

/// How a newly read config differs from the running one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys applied now.
    pub applied: Vec<&'static str>,
    /// Keys that changed but take effect only at the next start.
    pub need_restart: Vec<&'static str>,
}

impl Changes {
    pub fn schedule(&self) -> bool {
        self.applied.iter().any(|k| {
            matches!(
                *k,
                "schedule.battery"
                    | "schedule.battery_charging"
                    | "schedule.info"
                    | "schedule.spread"
            )
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.applied.contains(&key)
    }
}

/// Compares every key; secrets are compared, never printed.
pub fn compare(old: &Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    let mut check = |changed: bool, key: &'static str, live: bool| {
        if changed {
            if live {
                c.applied.push(key);
            } else {
                c.need_restart.push(key);
            }
        }
    };
    let (o, n) = (&old.smartcar, &new.smartcar);
    check(o.client_id != n.client_id, "smartcar.client_id", false);
    check(
        o.client_secret.expose() != n.client_secret.expose(),
        "smartcar.client_secret",
        false,
    );
    check(
        o.redirect_uri != n.redirect_uri,
        "smartcar.redirect_uri",
        false,
    );
    check(o.mode != n.mode, "smartcar.mode", false);
    check(o.api != n.api, "smartcar.api", false);
    check(o.scope != n.scope, "smartcar.scope", false);
    check(
        o.unit_system != n.unit_system,
        "smartcar.unit_system",
        false,
    );
    check(
        o.connect_url != n.connect_url,
        "smartcar.connect_url",
        false,
    );
    check(o.token_url != n.token_url, "smartcar.token_url", false);
    check(o.api_v2_url != n.api_v2_url, "smartcar.api_v2_url", false);
    check(o.api_v3_url != n.api_v3_url, "smartcar.api_v3_url", false);
    check(
        o.v3_page_size != n.v3_page_size,
        "smartcar.v3_page_size",
        false,
    );
    check(old.store.path != new.store.path, "store.path", false);
    check(old.retention != new.retention, "retention", false);
    check(
        old.backup.schedule != new.backup.schedule,
        "backup.schedule",
        false,
    );
    check(old.backup.keep != new.backup.keep, "backup.keep", false);
    check(old.backup.dir != new.backup.dir, "backup.dir", false);
    check(
        old.metrics.listen != new.metrics.listen,
        "metrics.listen",
        false,
    );
    check(
        old.metrics.per_vehicle_max != new.metrics.per_vehicle_max,
        "metrics.per_vehicle",
        false,
    );
    check(
        old.metrics.stale_after != new.metrics.stale_after,
        "metrics.stale_after",
        true,
    );
    check(
        old.metrics.web_config_file != new.metrics.web_config_file,
        "metrics.web_config_file",
        false,
    );
    let (o, n) = (&old.schedule, &new.schedule);
    check(o.battery != n.battery, "schedule.battery", true);
    check(
        o.battery_charging != n.battery_charging,
        "schedule.battery_charging",
        true,
    );
    check(o.info != n.info, "schedule.info", true);
    check(
        o.refresh_margin != n.refresh_margin,
        "schedule.refresh_margin",
        true,
    );
    check(
        o.discover_every != n.discover_every,
        "schedule.discover_every",
        true,
    );
    check(
        o.no_data_every != n.no_data_every,
        "schedule.no_data_every",
        true,
    );
    check(o.spread != n.spread, "schedule.spread", true);
    check(
        old.poll.concurrency != new.poll.concurrency,
        "poll.concurrency",
        true,
    );
    check(old.poll.timeout != new.poll.timeout, "poll.timeout", true);
    check(
        old.poll.max_in_flight != new.poll.max_in_flight,
        "poll.max_in_flight",
        false,
    );
    check(
        old.budget.calls_per_vehicle_month != new.budget.calls_per_vehicle_month,
        "budget.calls_per_vehicle_month",
        true,
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEnv;
    impl crate::config::Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn parse(extra: &str) -> Config {
        Config::parse(
            &format!("[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\n{extra}"),
            "c.toml",
            &NoEnv,
        )
        .unwrap()
    }

    #[test]
    fn live_keys_apply_and_the_rest_wait_for_a_restart() {
        let old = parse("");
        assert_eq!(compare(&old, &parse("")), Changes::default());
        let new = parse(
            "api = \"v2\"\n[schedule]\nbattery = \"0 */5 * * * *\"\n[poll]\ntimeout = \"20s\"\n\
             [budget]\ncalls_per_vehicle_month = 500\n[store]\npath = \"/tmp/x.db\"\n",
        );
        let c = compare(&old, &new);
        assert_eq!(
            c.applied,
            [
                "schedule.battery",
                "poll.timeout",
                "budget.calls_per_vehicle_month"
            ]
        );
        // backup.dir defaults to beside the store, so it moves with it.
        assert_eq!(c.need_restart, ["smartcar.api", "store.path", "backup.dir"]);
        assert!(c.schedule());
        let secret = Config::parse(
            "[smartcar]\nclient_id = \"a\"\nclient_secret = \"other\"\n",
            "c.toml",
            &NoEnv,
        )
        .unwrap();
        assert_eq!(
            compare(&old, &secret).need_restart,
            ["smartcar.client_secret"]
        );
    }
}
