//! Simulated users and their battery-electric vehicles. Nothing per vehicle is stored but a
//! few numbers derived from the seed: every value is a closed-form function of the car's
//! report time, so ten thousand cars cost a few hundred bytes each and two requests in one
//! report window see exactly the same data.

use rand::{Rng, SeedableRng};

use crate::domain::ChargeState;

const MODELS: &[(&str, &str, u32, f64)] = &[
    // make, model, year, full range in km
    ("TESLA", "Model 3", 2021, 491.0),
    ("TESLA", "Model Y", 2023, 455.0),
    ("VOLKSWAGEN", "ID.4", 2022, 412.0),
    ("HYUNDAI", "IONIQ 5", 2023, 430.0),
    ("KIA", "EV6", 2022, 440.0),
    ("FORD", "Mustang Mach-E", 2021, 402.0),
    ("CHEVROLET", "Bolt EV", 2020, 417.0),
    ("NISSAN", "Leaf", 2019, 364.0),
    ("BMW", "i4", 2023, 484.0),
    ("POLESTAR", "2", 2022, 440.0),
];

#[derive(Clone, Debug)]
pub struct Vehicle {
    pub id: String,
    pub vin: String,
    pub make: &'static str,
    pub model: &'static str,
    pub year: u32,
    pub full_range_km: f64,
    pub capacity_kwh: f64,
    /// Where in its daily cycle the car is at simulated time 0, in simulated seconds.
    pub phase_s: f64,
    /// Offset of its report times inside the report interval, in ms.
    pub report_offset_ms: i64,
    pub base_odometer_km: f64,
    pub home: (f64, f64),
    pub user: usize,
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub vehicles: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct Fleet {
    pub users: Vec<User>,
    pub vehicles: Vec<Vehicle>,
    pub by_id: std::collections::HashMap<String, usize>,
}

/// A UUID-formatted id from the generator (deterministic for a seed).
pub fn uuid(rng: &mut impl Rng) -> String {
    let b: [u8; 16] = rng.random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn vin(rng: &mut impl Rng, make: &str) -> String {
    // VINs never use I, O or Q.
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPRSTUVWXYZ0123456789";
    let wmi = match make {
        "TESLA" => "5YJ",
        "VOLKSWAGEN" => "WVG",
        "HYUNDAI" => "KM8",
        "KIA" => "KNA",
        "FORD" => "3FM",
        "CHEVROLET" => "1G1",
        "NISSAN" => "1N4",
        "BMW" => "WBA",
        _ => "YSM",
    };
    let rest: String = (0..14)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("{wmi}{rest}")
}

impl Fleet {
    pub fn generate(seed: u64, users: usize, per_user: usize, report_interval_ms: i64) -> Fleet {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut fleet = Fleet {
            users: Vec::with_capacity(users),
            vehicles: Vec::with_capacity(users * per_user),
            by_id: Default::default(),
        };
        for u in 0..users {
            let mut user = User {
                id: uuid(&mut rng),
                vehicles: Vec::with_capacity(per_user),
            };
            for _ in 0..per_user {
                let (make, model, year, range) = MODELS[rng.random_range(0..MODELS.len())];
                let v = Vehicle {
                    id: uuid(&mut rng),
                    vin: vin(&mut rng, make),
                    make,
                    model,
                    year,
                    full_range_km: range,
                    capacity_kwh: (range / 6.0).round(),
                    phase_s: rng.random_range(0.0..CYCLE_S),
                    report_offset_ms: rng.random_range(0..report_interval_ms.max(1)),
                    base_odometer_km: rng.random_range(2_000.0..80_000.0_f64).round(),
                    home: (
                        37.0 + rng.random_range(0.0..1.0_f64),
                        -122.5 + rng.random_range(0.0..1.0_f64),
                    ),
                    user: u,
                };
                fleet.by_id.insert(v.id.clone(), fleet.vehicles.len());
                user.vehicles.push(fleet.vehicles.len());
                fleet.vehicles.push(v);
            }
            fleet.users.push(user);
        }
        fleet
    }
}

/// What the car reports at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub soc_percent: f64,
    pub range_km: f64,
    pub plugged_in: bool,
    pub charge_state: ChargeState,
    pub odometer_km: f64,
    pub latitude: f64,
    pub longitude: f64,
    pub charge_limit_percent: f64,
    /// Minutes to the charge limit while charging, else 0.
    pub minutes_to_complete: f64,
    pub phase: Phase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Parked,
    Driving,
    Charging,
}

/// One simulated day: parked, a drive, parked, then plugged in overnight.
pub const CYCLE_S: f64 = 24.0 * 3600.0;
const H: f64 = 3600.0;
const DRIVE_START: f64 = 8.0 * H;
const DRIVE_END: f64 = 9.5 * H;
const PLUG_IN: f64 = 18.0 * H;
const START_SOC: f64 = 80.0;
const CHARGE_LIMIT: f64 = 80.0;
/// Parked drain (%/h): the 12 V system and the occasional wake-up.
const DRAIN: f64 = 0.25;
/// State of charge one drive uses.
const DRIVE_SOC: f64 = 30.0;
/// Charging speed in %/h (an 11 kW wallbox on a ~75 kWh pack).
const CHARGE_RATE: f64 = 10.0;

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// The car's state at simulated time `t_s` (seconds since simulation start, phase applied).
pub fn snapshot(v: &Vehicle, t_s: f64) -> Snapshot {
    let t = t_s + v.phase_s;
    let cycles = (t / CYCLE_S).floor();
    let c = t - cycles * CYCLE_S;
    let drive_km = DRIVE_SOC / 100.0 * v.full_range_km;
    let soc_at_drive_end = START_SOC - DRAIN * DRIVE_START / H - DRIVE_SOC;
    let soc_at_plug = soc_at_drive_end - DRAIN * (PLUG_IN - DRIVE_END) / H;
    let (soc, phase, driven_today) = if c < DRIVE_START {
        (START_SOC - DRAIN * c / H, Phase::Parked, 0.0)
    } else if c < DRIVE_END {
        let f = (c - DRIVE_START) / (DRIVE_END - DRIVE_START);
        (
            START_SOC - DRAIN * DRIVE_START / H - DRIVE_SOC * f,
            Phase::Driving,
            drive_km * f,
        )
    } else if c < PLUG_IN {
        (
            soc_at_drive_end - DRAIN * (c - DRIVE_END) / H,
            Phase::Parked,
            drive_km,
        )
    } else {
        let soc = (soc_at_plug + CHARGE_RATE * (c - PLUG_IN) / H).min(CHARGE_LIMIT);
        (soc, Phase::Charging, drive_km)
    };
    let soc = round_to(soc.clamp(0.0, 100.0), 2);
    let plugged_in = phase == Phase::Charging;
    let charge_state = match phase {
        Phase::Charging if soc >= CHARGE_LIMIT => ChargeState::FullyCharged,
        Phase::Charging => ChargeState::Charging,
        _ => ChargeState::NotCharging,
    };
    // Driving goes round a 5 km circle from home.
    let angle = driven_today / 5.0 * std::f64::consts::TAU;
    let (lat, lon) = if phase == Phase::Driving {
        (
            v.home.0 + 0.01 * angle.sin(),
            v.home.1 + 0.01 * (1.0 - angle.cos()),
        )
    } else {
        v.home
    };
    Snapshot {
        soc_percent: soc,
        range_km: round_to(soc / 100.0 * v.full_range_km, 1),
        plugged_in,
        charge_state,
        odometer_km: round_to(v.base_odometer_km + cycles * drive_km + driven_today, 1),
        latitude: round_to(lat, 6),
        longitude: round_to(lon, 6),
        charge_limit_percent: CHARGE_LIMIT,
        minutes_to_complete: if charge_state == ChargeState::Charging {
            ((CHARGE_LIMIT - soc) / CHARGE_RATE * 60.0).ceil()
        } else {
            0.0
        },
        phase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_fleet() {
        let a = Fleet::generate(7, 3, 2, 5000);
        let b = Fleet::generate(7, 3, 2, 5000);
        assert_eq!(a.users.len(), 3);
        assert_eq!(a.vehicles.len(), 6);
        for (x, y) in a.vehicles.iter().zip(&b.vehicles) {
            assert_eq!((&x.id, &x.vin), (&y.id, &y.vin));
            assert_eq!(x.vin.len(), 17);
            assert!(!x.vin.contains(['I', 'O', 'Q']));
        }
        assert_ne!(
            a.vehicles[0].id,
            Fleet::generate(8, 3, 2, 5000).vehicles[0].id
        );
        assert_eq!(a.vehicles[0].id.len(), 36);
    }

    #[test]
    fn a_day_drains_drives_and_charges_back() {
        let mut v = Fleet::generate(1, 1, 1, 1000).vehicles[0].clone();
        v.phase_s = 0.0;
        let s = |h: f64| snapshot(&v, h * H);
        assert_eq!(s(0.0).soc_percent, 80.0);
        assert_eq!(s(4.0).phase, Phase::Parked);
        assert!(s(9.0).phase == Phase::Driving && s(9.0).soc_percent < s(8.0).soc_percent);
        assert!(s(9.5).odometer_km > s(8.0).odometer_km);
        assert_eq!(s(19.0).charge_state, ChargeState::Charging);
        assert!(s(19.0).plugged_in);
        assert_eq!(s(23.0).charge_state, ChargeState::FullyCharged);
        assert_eq!(s(23.0).soc_percent, 80.0);
        assert_eq!(s(12.0).charge_state, ChargeState::NotCharging);
        // The next day starts where this one ended, one drive further on the odometer.
        let drive_km = DRIVE_SOC / 100.0 * v.full_range_km;
        assert!((s(24.0).odometer_km - s(0.0).odometer_km - drive_km).abs() < 0.11);
    }
}
