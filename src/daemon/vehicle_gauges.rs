//! Gauge families whose series each belong to one vehicle (`vehicle_id` is their first label),
//! kept compactly and written straight to the text exposition format.
//!
//! Why not the `prometheus` crate's `GaugeVec`: each of its series carries a clone of its
//! family's descriptor (name, help text, label names) and its label pairs as protobuf
//! messages, ~1 KB a series. A vehicle has ~25 per-vehicle series, so 10,000 vehicles with
//! per-vehicle metrics on took ~270 MB (fleet bench: 310 MiB RSS against 43 MiB with them off).
//! Here a series is its vehicle's shared id, the values of its other labels and an `f64`.
//!
//! The text is what the crate's `TextEncoder` writes for a gauge family (`# HELP`, `# TYPE`,
//! one line per series with the labels sorted by name, values formatted by `f64`'s `Display`),
//! so scrapers see no difference; a family without series is not written at all, as the
//! crate's `gather` leaves it out.
//!
//! [`ComputedGauges`] writes a family the same way from series its owner computes at the
//! scrape instead of keeping them (the reading ages: now − recorded_at, issue 8).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

/// One vehicle's series of a family: which values its labels after `vehicle_id` have (an
/// index into the family's [`Series::combos`]) and the gauge's value.
///
/// A boxed slice, not a `Vec`: a series is added once per vehicle and label combination and
/// then only set, and a `Vec`'s first push reserves four (64 bytes where most families hold
/// one series of 16). At 10,000 vehicles that was ~4 MB of the families' ~17 MB (heaptrack,
/// issue 8).
type VehicleSeries = Box<[(u32, f64)]>;

/// A family's series. The other labels' values are few (states, signals; make, model and
/// year are per model, not per vehicle) and kept once each.
#[derive(Default)]
struct Series {
    by_vehicle: HashMap<Arc<str>, VehicleSeries>,
    /// Every combination of the labels after `vehicle_id` seen, in declared order.
    combos: Vec<Box<[Box<str>]>>,
}

impl Series {
    /// The index of `rest` among the combinations, added when new.
    fn combo<V: AsRef<str>>(&mut self, rest: &[V]) -> u32 {
        if let Some(i) = self.find(rest) {
            return i;
        }
        self.combos
            .push(rest.iter().map(|r| Box::from(r.as_ref())).collect());
        u32::try_from(self.combos.len() - 1).unwrap_or(u32::MAX)
    }

    fn find<V: AsRef<str>>(&self, rest: &[V]) -> Option<u32> {
        self.combos
            .iter()
            .position(|c| same(c, rest))
            .and_then(|i| u32::try_from(i).ok())
    }
}

/// A family's name, help and labels, and how its text is laid out: what a kept
/// ([`VehicleGauges`]) and a computed ([`ComputedGauges`]) family share.
struct Shape {
    name: &'static str,
    help: &'static str,
    /// Declared label names; the first is `vehicle_id`.
    labels: &'static [&'static str],
    /// Indexes into `labels` in the order the text writes them (sorted by name).
    order: Vec<usize>,
}

impl Shape {
    fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Shape {
        debug_assert_eq!(labels.first(), Some(&"vehicle_id"));
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by_key(|i| labels[*i]);
        Shape {
            name,
            help,
            labels,
            order,
        }
    }

    /// Appends the family with `rows` as its series, in the text exposition format; `label`
    /// gives a row's value of label `i` (declared order). Sorted as the crate's `gather`
    /// sorts: by the label values, in the order of the label names. No rows, no text.
    fn write<'a, R>(
        &self,
        rows: &mut [R],
        label: impl Fn(&R, usize) -> &'a str,
        value: impl Fn(&R) -> f64,
        out: &mut String,
    ) {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, escape(self.help, false));
        let _ = writeln!(out, "# TYPE {} gauge", self.name);
        rows.sort_unstable_by(|a, b| {
            self.order
                .iter()
                .map(|&i| label(a, i).cmp(label(b, i)))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        // One allocation for the family's text (a doubling String held old and new at once).
        out.reserve(rows.len() * (self.name.len() + 64 + 24 * self.labels.len()));
        for row in rows.iter() {
            out.push_str(self.name);
            let mut sep = '{';
            for &i in &self.order {
                out.push(sep);
                out.push_str(self.labels[i]);
                out.push_str("=\"");
                out.push_str(&escape(label(row, i), true));
                out.push('"');
                sep = ',';
            }
            out.push('}');
            let _ = writeln!(out, " {}", value(row));
        }
    }
}

struct Family {
    shape: Shape,
    series: Mutex<Series>,
}

/// A per-vehicle gauge family (see the module doc). Cloning shares the family.
#[derive(Clone)]
pub struct VehicleGauges(Arc<Family>);

/// One series of a family, named by its label values (vehicle id first).
pub struct SeriesRef<'a, V: AsRef<str>> {
    family: &'a Family,
    values: &'a [V],
}

/// A label set that names no series of the family.
#[derive(Debug)]
pub struct NoSuchSeries;

impl VehicleGauges {
    /// A family named `name`; `labels[0]` must be `vehicle_id`.
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        VehicleGauges(Arc::new(Family {
            shape: Shape::new(name, help, labels),
            series: Mutex::new(Series::default()),
        }))
    }

    /// The series with these label values (vehicle id first, then the others in declared
    /// order), as `GaugeVec::with_label_values` names one.
    pub fn with_label_values<'a, V: AsRef<str>>(&'a self, values: &'a [V]) -> SeriesRef<'a, V> {
        SeriesRef {
            family: &self.0,
            values,
        }
    }

    /// The family's name.
    pub fn name(&self) -> &'static str {
        self.0.shape.name
    }

    /// Drops one series.
    pub fn remove_label_values<V: AsRef<str>>(&self, values: &[V]) -> Result<(), NoSuchSeries> {
        let Some((id, rest)) = values.split_first() else {
            return Err(NoSuchSeries);
        };
        let mut all = self.0.lock();
        let Some(combo) = all.find(rest) else {
            return Err(NoSuchSeries);
        };
        let Some(series) = all.by_vehicle.get_mut(id.as_ref()) else {
            return Err(NoSuchSeries);
        };
        let before = series.len();
        *series = series
            .iter()
            .copied()
            .filter(|(c, _)| *c != combo)
            .collect();
        let removed = series.len() < before;
        if series.is_empty() {
            all.by_vehicle.remove(id.as_ref());
        }
        if removed {
            Ok(())
        } else {
            Err(NoSuchSeries)
        }
    }

    /// Drops every series of one vehicle.
    pub fn remove_vehicle(&self, id: &str) {
        self.0.lock().by_vehicle.remove(id);
    }

    /// Drops every series, with the memory that held them (per-vehicle series switched off
    /// at 10,000 vehicles stay off).
    pub fn reset(&self) {
        *self.0.lock() = Series::default();
    }

    /// How many series the family holds.
    pub fn len(&self) -> usize {
        self.0.lock().by_vehicle.values().map(|s| s.len()).sum()
    }

    /// Whether the family holds no series (then [`VehicleGauges::render`] writes nothing).
    pub fn is_empty(&self) -> bool {
        self.0.lock().by_vehicle.is_empty()
    }

    /// Appends the family in the text exposition format, series sorted by label values.
    pub fn render(&self, out: &mut String) {
        let f = &*self.0;
        let all = f.lock();
        let mut rows: Vec<(&Arc<str>, u32, f64)> = Vec::with_capacity(all.by_vehicle.len());
        for (id, series) in &all.by_vehicle {
            rows.extend(series.iter().map(|(combo, v)| (id, *combo, *v)));
        }
        f.shape.write(
            &mut rows,
            |r, i| value_of(&all.combos, r.0, r.1, i),
            |r| r.2,
            out,
        );
    }
}

/// A per-vehicle gauge family whose series are not kept but computed by its owner at each
/// render (see the module doc): the same text as a [`VehicleGauges`] holding those values.
#[derive(Clone)]
pub struct ComputedGauges(Arc<Shape>);

impl ComputedGauges {
    /// A family named `name`; `labels[0]` must be `vehicle_id`.
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        ComputedGauges(Arc::new(Shape::new(name, help, labels)))
    }

    /// The family's name.
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    /// Appends the family with `rows` as its series (label values in declared order, vehicle
    /// id first, then the value); sorts `rows`. No rows: nothing is written.
    pub fn render<const N: usize>(&self, rows: &mut [([&str; N], f64)], out: &mut String) {
        debug_assert_eq!(
            N,
            self.0.labels.len(),
            "{}: wrong number of labels",
            self.0.name
        );
        self.0
            .write(rows, |r, i| r.0.get(i).copied().unwrap_or(""), |r| r.1, out);
    }
}

impl Family {
    fn lock(&self) -> MutexGuard<'_, Series> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<V: AsRef<str>> SeriesRef<'_, V> {
    /// The vehicle id and the other label values of a series about to be set; `None` for a
    /// label set of the wrong length, a programming error: the crate panics, this keeps the
    /// daemon up and the series out.
    fn to_set(&self) -> Option<(&V, &[V])> {
        let parts = self.values.split_first()?;
        if self.values.len() != self.family.shape.labels.len() {
            debug_assert!(false, "{}: wrong number of labels", self.family.shape.name);
            return None;
        }
        Some(parts)
    }

    /// Sets the series, creating it at its first value.
    pub fn set(&self, value: f64) {
        let Some((id, rest)) = self.to_set() else {
            return;
        };
        let mut all = self.family.lock();
        let combo = all.combo(rest);
        let series = match all.by_vehicle.get_mut(id.as_ref()) {
            Some(s) => s,
            None => all.by_vehicle.entry(Arc::from(id.as_ref())).or_default(),
        };
        match series.iter_mut().find(|(c, _)| *c == combo) {
            Some((_, v)) => *v = value,
            // A new combination: rare (once per vehicle and state, signal or label set).
            None => {
                let mut grown = std::mem::take(series).into_vec();
                grown.push((combo, value));
                *series = grown.into_boxed_slice();
            }
        }
    }

    /// Sets the series and drops the vehicle's other series of the family, at once (a
    /// family with one series per vehicle whose labels change, like make, model and year).
    pub fn set_alone(&self, value: f64) {
        let Some((id, rest)) = self.to_set() else {
            return;
        };
        let mut all = self.family.lock();
        let combo = all.combo(rest);
        all.by_vehicle
            .insert(Arc::from(id.as_ref()), Box::new([(combo, value)]));
    }

    /// Sets the series only if it has no value yet (a start's seed from the store must not
    /// overwrite what a poll already said).
    pub fn set_if_absent(&self, value: f64) {
        let Some((id, rest)) = self.values.split_first() else {
            return;
        };
        let all = self.family.lock();
        let present = all.find(rest).is_some_and(|combo| {
            all.by_vehicle
                .get(id.as_ref())
                .is_some_and(|s| s.iter().any(|(c, _)| *c == combo))
        });
        drop(all);
        if !present {
            self.set(value);
        }
    }

    /// The series' value (0 when it has none, as a new gauge reads).
    pub fn get(&self) -> f64 {
        let Some((id, rest)) = self.values.split_first() else {
            return 0.0;
        };
        let all = self.family.lock();
        let Some(combo) = all.find(rest) else {
            return 0.0;
        };
        all.by_vehicle
            .get(id.as_ref())
            .and_then(|s| s.iter().find(|(c, _)| *c == combo))
            .map_or(0.0, |(_, v)| *v)
    }
}

/// The value of label `i` (declared order) of a series: the vehicle's id, or one of its
/// combination's values.
fn value_of<'a>(combos: &'a [Box<[Box<str>]>], id: &'a str, combo: u32, i: usize) -> &'a str {
    if i == 0 {
        id
    } else {
        combos
            .get(combo as usize)
            .and_then(|c| c.get(i - 1))
            .map_or("", |v| &**v)
    }
}

fn same<V: AsRef<str>>(extra: &[Box<str>], rest: &[V]) -> bool {
    extra.len() == rest.len() && extra.iter().zip(rest).all(|(a, b)| &**a == b.as_ref())
}

/// The text format's escaping, as the crate's encoder does it: `\` and a newline always, `"`
/// in label values.
fn escape(v: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    if !(v.contains(['\\', '\n']) || quote && v.contains('"')) {
        return v.into();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder as _, GaugeVec, Opts, Registry, TextEncoder};

    /// The same series through the crate's `GaugeVec` and its encoder, for comparison.
    fn crate_text(name: &str, help: &str, labels: &[&str], sets: &[(&[&str], f64)]) -> String {
        let r = Registry::new();
        let g = GaugeVec::new(Opts::new(name, help), labels).unwrap();
        r.register(Box::new(g.clone())).unwrap();
        for (values, v) in sets {
            g.with_label_values(values).set(*v);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    /// A family's name, label names and the series set in it.
    type Case = (
        &'static str,
        &'static [&'static str],
        Vec<(&'static [&'static str], f64)>,
    );

    #[test]
    fn the_text_is_what_the_crate_writes() {
        let cases: [Case; 3] = [
            (
                "t_soc_ratio",
                &["vehicle_id"],
                vec![(&["v2"], 0.5), (&["v1"], 0.999), (&["v3"], 1700000000.0)],
            ),
            (
                "t_state",
                &["vehicle_id", "state"],
                vec![
                    (&["v1", "ok"], 1.0),
                    (&["v1", "disabled"], 0.0),
                    (&["a\"b\\c\nd", "ok"], -2.5),
                ],
            ),
            (
                "t_info",
                &["vehicle_id", "make", "model", "year"],
                vec![(&["v1", "TESLA", "Model \"3\"", "2021"], 1.0)],
            ),
        ];
        for (name, labels, sets) in cases {
            let help = "Help with a \\ backslash\nand a newline.";
            let ours = VehicleGauges::new(name, help, labels);
            for (values, v) in &sets {
                ours.with_label_values(values).set(*v);
            }
            let mut text = String::new();
            ours.render(&mut text);
            assert_eq!(text, crate_text(name, help, labels, &sets), "{name}");
        }
    }

    /// A computed family writes what the crate writes for the same series (and what a kept
    /// family writes), in whatever order the rows come.
    #[test]
    fn a_computed_family_writes_the_same_text() {
        let (name, labels): (&str, &'static [&'static str]) =
            ("t_age_seconds", &["vehicle_id", "signal"]);
        let help = "Age, with a \\ backslash\nand a newline.";
        let sets: Vec<(&[&str], f64)> = vec![
            (&["v2", "odometer"], 12.5),
            (&["v1", "odometer"], 0.001),
            (&["v1", "battery"], 3600.0),
            (&["a\"b\\c\nd", "charge"], -2.5),
            (&["v10", "battery"], 1e21),
        ];
        let computed = ComputedGauges::new(name, help, labels);
        let mut rows: Vec<([&str; 2], f64)> =
            sets.iter().map(|(l, v)| ([l[0], l[1]], *v)).collect();
        let mut text = String::new();
        computed.render(&mut rows, &mut text);
        assert_eq!(text, crate_text(name, help, labels, &sets));
        let kept = VehicleGauges::new(name, help, labels);
        for (values, v) in &sets {
            kept.with_label_values(values).set(*v);
        }
        let mut kept_text = String::new();
        kept.render(&mut kept_text);
        assert_eq!(text, kept_text);
        let mut none = String::new();
        computed.render::<2>(&mut [], &mut none);
        assert_eq!(none, "", "a family without series is not written");
    }

    #[test]
    fn series_are_set_read_removed_and_reset() {
        let g = VehicleGauges::new("t_state", "h", &["vehicle_id", "state"]);
        let mut text = String::new();
        g.render(&mut text);
        assert_eq!(text, "", "an empty family is not written");
        g.with_label_values(&["v1", "ok"]).set(1.0);
        g.with_label_values(&["v1", "ok"]).set(0.0);
        g.with_label_values(&["v1", "ok"]).set_if_absent(5.0);
        assert_eq!(
            g.with_label_values(&["v1", "ok"]).get(),
            0.0,
            "kept: it had a value"
        );
        g.with_label_values(&["v1", "paused"]).set_if_absent(1.0);
        g.with_label_values(&["v2".to_string(), "ok".to_string()])
            .set(1.0);
        assert_eq!(g.len(), 3);
        assert_eq!(g.with_label_values(&["v1", "paused"]).get(), 1.0);
        assert!(g.remove_label_values(&["v1", "paused"]).is_ok());
        assert!(g.remove_label_values(&["v1", "paused"]).is_err());
        assert_eq!(g.len(), 2);
        g.with_label_values(&["v3", "ok"]).set(1.0);
        g.with_label_values(&["v3", "paused"]).set_alone(1.0);
        assert_eq!(g.with_label_values(&["v3", "ok"]).get(), 0.0, "dropped");
        assert_eq!(g.with_label_values(&["v3", "paused"]).get(), 1.0);
        g.remove_vehicle("v3");
        g.remove_vehicle("v1");
        assert_eq!(g.len(), 1);
        g.reset();
        assert!(g.is_empty());
    }
}
