//! The HTML report (`attach --html`, `report --html`): one self-contained page to look at and
//! share after an incident. It holds a timeline of the run (the iterations' p99 and maximum per
//! interval, each stall a mark coloured by its origin), the table of causes with the
//! vocabulary's advice, the heaviest stalls with their flamegraphs rooted at their origin,
//! memory growth by origin, the connection census, accept-queue overflows and lost events.
//!
//! The page embeds everything it uses (Chart.js 4, MIT, vendored; its style and its script) and
//! its data as JSON in a `<script type="application/json">` element; its script puts text in
//! the page with `textContent` only, and its Content-Security-Policy lets it load nothing. What
//! a recording holds is bounded here: [`MAX_MARKS`] stalls on the timeline, [`MAX_POINTS`]
//! points per series, [`MAX_DETAILED`] flamegraphs, so a long run makes a page of a few MiB.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use base64::Engine as _;
use serde::Serialize;

use super::{
    FoldedStacks, Sink, create_output_file, human_bytes, human_duration_us,
    record::{
        AcceptOverflow, Attached, ConnectionCensus, Instance, IntervalReport, MemoryReport, Stall,
        StallCauses, Summary,
    },
};
use crate::{attribute::vocabulary::Vocabulary, bounded::BoundedMap, cli::StackRoot};

/// Stalls drawn on the timeline and listed; later ones are counted.
pub const MAX_MARKS: usize = 10_000;
/// Points kept per series (intervals, memory reports, censuses); later ones are counted.
pub const MAX_POINTS: usize = 20_000;
/// The heaviest stalls shown with their details and flamegraphs.
pub const MAX_DETAILED: usize = 24;
/// Servers listed (an `--all` run through servers that come and go); later ones are counted.
const MAX_SERVERS: usize = 4096;
/// Client addresses whose opens and closes are summed over the run.
const MAX_CLIENT_ADDRESSES: usize = 1_000;
/// Client addresses listed, most connections opened and closed first.
const TOP_CLIENTS: usize = 20;

const TEMPLATE: &str = include_str!("report.html");
const STYLE: &str = include_str!("report.css");
const SCRIPT: &str = include_str!("report.js");
/// Chart.js 4.6.1 (`dist/chart.umd.min.js`, MIT: `chart.js-LICENSE.md`).
const CHART_JS: &str = include_str!("chart.umd.min.js");

/// Seconds since the Unix epoch, as the page's script reads times.
fn epoch_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// What the page shows, as its script reads it.
#[derive(Debug, Default, Serialize)]
struct ReportData {
    /// Most stalls first.
    instances: Vec<InstanceView>,
    intervals: Vec<IntervalPoint>,
    stalls: Vec<StallMark>,
    details: Vec<StallDetail>,
    causes: Vec<CauseRow>,
    memory: Vec<MemoryPoint>,
    census: Vec<CensusPoint>,
    clients: Vec<ClientRow>,
    overflows: Vec<OverflowRow>,
    lost: Vec<LostRow>,
    /// What did not fit: stalls not drawn, points not kept.
    left_out: LeftOut,
}

#[derive(Debug, Default, Clone, Serialize)]
struct InstanceView {
    /// `redis-server:6379 pid 1234`.
    label: String,
    name: String,
    attached: Option<f64>,
    threshold_us: u64,
    probes: String,
    summary: Option<SummaryView>,
}

#[derive(Debug, Clone, Serialize)]
struct SummaryView {
    iterations: u64,
    stalls: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    duration_s: f64,
    stopped: String,
    lost_events: u64,
}

#[derive(Debug, Serialize)]
struct IntervalPoint {
    instance: String,
    t: f64,
    iterations: u64,
    p99_us: u64,
    max_us: u64,
    stalls: u64,
}

/// One stall on the timeline, with what its summary line says.
#[derive(Debug, Serialize)]
struct StallMark {
    id: usize,
    instance: String,
    t: f64,
    duration_us: u64,
    duration: String,
    origin: String,
    mechanism: String,
    on_cpu_us: u64,
    off_cpu_us: u64,
    runqueue_us: u64,
    client: String,
    waiting: String,
    accept: String,
    madvise: String,
    incomplete: bool,
}

/// A stall shown whole: its breakdown and its flamegraph (an SVG `data:` URI).
#[derive(Debug, Serialize)]
struct StallDetail {
    id: usize,
    breakdown: Vec<BreakdownRow>,
    flamegraph: String,
}

#[derive(Debug, Serialize)]
struct BreakdownRow {
    origin: String,
    mechanism: String,
    us: u64,
    share: f64,
}

#[derive(Debug, Serialize)]
struct CauseRow {
    origin: String,
    mechanism: String,
    stalls: u64,
    total_us: u64,
    max_us: u64,
    meaning: String,
    advice: String,
}

#[derive(Debug, Serialize)]
struct MemoryPoint {
    instance: String,
    t: f64,
    resident_bytes: u64,
    /// Growth by origin in the interval.
    growth: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct CensusPoint {
    instance: String,
    t: f64,
    established: u64,
    opened: u64,
    closed: u64,
    addresses: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct ClientRow {
    addr: String,
    opened: u64,
    closed: u64,
    max_established: u64,
}

#[derive(Debug, Serialize)]
struct OverflowRow {
    instance: String,
    t: f64,
    port: Option<u16>,
    overflows: u64,
    max_queue: u32,
    limit: u32,
    in_stall: bool,
}

#[derive(Debug, Serialize)]
struct LostRow {
    instance: String,
    count: u64,
    meaning: String,
}

#[derive(Debug, Default, Serialize)]
struct LeftOut {
    servers: u64,
    stalls: u64,
    points: u64,
    client_addresses: u64,
}

/// The report being gathered from a run's records.
pub struct HtmlReport {
    data: ReportData,
    /// Each server's view, by pid.
    instances: BTreeMap<u32, InstanceView>,
    /// Each server's label (with its port once known), by pid; and every label a record gave
    /// it before, to name all its records alike.
    labels: HashMap<u32, String>,
    aliases: HashMap<String, u32>,
    causes: StallCauses,
    /// The heaviest stalls so far (at most [`MAX_DETAILED`]) with their mark's id.
    heaviest: Vec<(usize, Stall)>,
    clients: BoundedMap<String, ClientRow>,
    stalls_seen: usize,
}

impl Default for HtmlReport {
    fn default() -> Self {
        Self {
            data: ReportData::default(),
            instances: BTreeMap::new(),
            labels: HashMap::new(),
            aliases: HashMap::new(),
            causes: StallCauses::default(),
            heaviest: Vec::new(),
            clients: BoundedMap::new(MAX_CLIENT_ADDRESSES),
            stalls_seen: 0,
        }
    }
}

/// Pushes `item` unless `points` is full, then counts it as left out.
fn push_bounded<T>(points: &mut Vec<T>, item: T, left_out: &mut u64) {
    if points.len() < MAX_POINTS {
        points.push(item);
    } else {
        *left_out += 1;
    }
}

impl HtmlReport {
    /// The label of `instance`, remembered: a server's port may be known only later.
    fn label(&mut self, instance: &Instance) -> String {
        let label = instance.to_string();
        let known = self.labels.contains_key(&instance.pid);
        if (known && instance.port.is_some()) || (!known && self.labels.len() < MAX_SERVERS) {
            self.labels.insert(instance.pid, label.clone());
        }
        if self.aliases.len() < MAX_POINTS {
            self.aliases.insert(label.clone(), instance.pid);
        }
        label
    }

    /// The view of `instance`, unless [`MAX_SERVERS`] others are listed (then it is counted).
    fn instance(&mut self, instance: &Instance) -> Option<&mut InstanceView> {
        self.label(instance);
        if self.instances.len() >= MAX_SERVERS && !self.instances.contains_key(&instance.pid) {
            self.data.left_out.servers += 1;
            return None;
        }
        Some(self.instances.entry(instance.pid).or_default())
    }

    pub fn add_attached(&mut self, attached: &Attached) {
        let Some(view) = self.instance(&attached.instance) else {
            return;
        };
        view.name = attached.name.clone();
        view.attached = Some(epoch_seconds(attached.time));
        view.threshold_us = attached.threshold_us;
        view.probes = attached.probes.clone();
    }

    pub fn add_stall(&mut self, stall: &Stall) {
        let id = self.stalls_seen;
        self.stalls_seen += 1;
        self.causes.add(stall);
        if self.data.stalls.len() < MAX_MARKS {
            let mut mark = mark(id, stall);
            mark.instance = self.label(&stall.instance);
            self.data.stalls.push(mark);
        } else {
            self.data.left_out.stalls += 1;
        }
        let lightest = self
            .heaviest
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, kept))| kept.duration_us)
            .map(|(index, (_, kept))| (index, kept.duration_us));
        match lightest {
            _ if self.heaviest.len() < MAX_DETAILED => self.heaviest.push((id, stall.clone())),
            Some((index, duration_us)) if stall.duration_us > duration_us => {
                self.heaviest[index] = (id, stall.clone());
            }
            _ => {}
        }
        if let Some(accept) = stall.accept.as_ref().filter(|accept| accept.overflows > 0) {
            let row = OverflowRow {
                instance: self.label(&stall.instance),
                t: epoch_seconds(stall.start),
                port: stall.instance.port,
                overflows: accept.overflows,
                max_queue: accept.max_queue,
                limit: accept.limit,
                in_stall: true,
            };
            push_bounded(
                &mut self.data.overflows,
                row,
                &mut self.data.left_out.points,
            );
        }
    }

    pub fn add_interval(&mut self, report: &IntervalReport) {
        let point = IntervalPoint {
            instance: self.label(&report.instance),
            t: epoch_seconds(report.time),
            iterations: report.iterations,
            p99_us: report.p99_us,
            max_us: report.max_us,
            stalls: report.stalls,
        };
        push_bounded(
            &mut self.data.intervals,
            point,
            &mut self.data.left_out.points,
        );
    }

    pub fn add_memory(&mut self, report: &MemoryReport) {
        let mut growth = BTreeMap::new();
        for entry in &report.growth.growth {
            *growth.entry(entry.origin.clone()).or_insert(0u64) += entry.bytes;
        }
        let point = MemoryPoint {
            instance: self.label(&report.instance),
            t: epoch_seconds(report.time),
            resident_bytes: report.growth.resident_bytes,
            growth,
        };
        push_bounded(&mut self.data.memory, point, &mut self.data.left_out.points);
    }

    pub fn add_connections(&mut self, census: &ConnectionCensus) {
        let point = CensusPoint {
            instance: self.label(&census.instance),
            t: epoch_seconds(census.time),
            established: census.established,
            opened: census.opened,
            closed: census.closed,
            addresses: census.addresses,
        };
        push_bounded(&mut self.data.census, point, &mut self.data.left_out.points);
        for client in &census.clients {
            let row = self.clients.entry(client.addr.clone());
            row.opened += client.opened;
            row.closed += client.closed;
            row.max_established = row.max_established.max(client.established);
        }
    }

    pub fn add_overflow(&mut self, overflow: &AcceptOverflow) {
        let row = OverflowRow {
            instance: self.label(&overflow.instance),
            t: epoch_seconds(overflow.time),
            port: Some(overflow.port),
            overflows: overflow.overflows,
            max_queue: overflow.max_queue,
            limit: overflow.limit,
            in_stall: false,
        };
        push_bounded(
            &mut self.data.overflows,
            row,
            &mut self.data.left_out.points,
        );
    }

    pub fn add_summary(&mut self, summary: &Summary) {
        let key = self.label(&summary.instance);
        let lost: Vec<LostRow> = summary
            .lost
            .described()
            .into_iter()
            .map(|(count, meaning)| LostRow {
                instance: key.clone(),
                count,
                meaning: meaning.to_owned(),
            })
            .collect();
        self.data.lost.retain(|row| row.instance != key);
        self.data.lost.extend(lost);
        let view = SummaryView {
            iterations: summary.iterations,
            stalls: summary.stalls,
            p50_us: summary.p50_us,
            p99_us: summary.p99_us,
            p999_us: summary.p999_us,
            max_us: summary.max_us,
            duration_s: summary.duration_s,
            stopped: serde_json::to_value(summary.stopped)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_default(),
            lost_events: summary.lost_events,
        };
        if let Some(instance) = self.instance(&summary.instance) {
            instance.summary = Some(view);
        }
        for (count, meaning) in [
            (
                summary.run_lost.undecodable,
                "records that did not decode (they name no target)",
            ),
            (
                summary.run_lost.of_ended_targets,
                "events of a target whose watch had ended",
            ),
        ] {
            self.data
                .lost
                .retain(|row| !(row.instance.is_empty() && row.meaning == meaning));
            if count > 0 {
                self.data.lost.push(LostRow {
                    instance: String::new(),
                    count,
                    meaning: meaning.to_owned(),
                });
            }
        }
    }

    /// The page's data as it stands: the causes with their advice, the heaviest stalls'
    /// flamegraphs, the busiest clients.
    fn data(&mut self) -> io::Result<&ReportData> {
        self.name_instances();
        let vocabulary = Vocabulary::builtin();
        self.data.causes = self
            .causes
            .summary()
            .into_iter()
            .map(|cause| {
                let origin = vocabulary.origin(&cause.origin);
                let mechanism = vocabulary.mechanism(&cause.mechanism);
                let text = |part: fn(&crate::attribute::vocabulary::Entry) -> &str| {
                    [origin, mechanism]
                        .into_iter()
                        .flatten()
                        .map(part)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                CauseRow {
                    meaning: text(|entry| &entry.meaning),
                    advice: text(|entry| &entry.advice),
                    origin: cause.origin,
                    mechanism: cause.mechanism,
                    stalls: cause.stalls,
                    total_us: cause.total_us,
                    max_us: cause.max_us,
                }
            })
            .collect();
        let mut heaviest: Vec<&(usize, Stall)> = self.heaviest.iter().collect();
        heaviest.sort_by_key(|(_, stall)| std::cmp::Reverse(stall.duration_us));
        self.data.details = heaviest
            .into_iter()
            .map(|(id, stall)| detail(*id, stall))
            .collect::<io::Result<_>>()?;
        let mut clients: Vec<ClientRow> = self
            .clients
            .iter()
            .map(|(addr, row)| ClientRow {
                addr: addr.clone(),
                ..row.clone()
            })
            .collect();
        clients
            .sort_by_key(|row| std::cmp::Reverse((row.opened + row.closed, row.max_established)));
        clients.truncate(TOP_CLIENTS);
        self.data.clients = clients;
        self.data.left_out.client_addresses = self.clients.folded();
        Ok(&self.data)
    }

    /// Names every record of a server by its last label, and lists the servers, most stalls
    /// first.
    fn name_instances(&mut self) {
        let latest = |label: &mut String| {
            if let Some(newest) = self
                .aliases
                .get(label.as_str())
                .and_then(|pid| self.labels.get(pid))
            {
                label.clone_from(newest);
            }
        };
        let data = &mut self.data;
        data.intervals
            .iter_mut()
            .for_each(|p| latest(&mut p.instance));
        data.stalls.iter_mut().for_each(|p| latest(&mut p.instance));
        data.memory.iter_mut().for_each(|p| latest(&mut p.instance));
        data.census.iter_mut().for_each(|p| latest(&mut p.instance));
        data.overflows
            .iter_mut()
            .for_each(|p| latest(&mut p.instance));
        data.lost.iter_mut().for_each(|p| latest(&mut p.instance));
        let mut instances: Vec<InstanceView> = self
            .instances
            .iter()
            .map(|(pid, view)| InstanceView {
                label: self.labels.get(pid).cloned().unwrap_or_default(),
                ..view.clone()
            })
            .collect();
        instances.sort_by_key(|view| {
            std::cmp::Reverse(view.summary.as_ref().map_or(0, |summary| summary.stalls))
        });
        data.instances = instances;
    }

    /// Writes the page, streamed: the template's parts in turn, the data serialized straight
    /// into the writer. The flamegraphs are made for this write and not kept.
    pub fn write(&mut self, writer: impl io::Write) -> io::Result<()> {
        let mut writer = BufWriter::new(writer);
        let mut rest = TEMPLATE;
        for (placeholder, part) in [
            ("/*STYLE*/", Part::Text(STYLE)),
            ("{{DATA}}", Part::Data),
            ("/*CHART_JS*/", Part::Text(CHART_JS)),
            ("/*SCRIPT*/", Part::Text(SCRIPT)),
        ] {
            let (before, after) = rest
                .split_once(placeholder)
                .ok_or_else(|| io::Error::other(format!("the template lacks {placeholder}")))?;
            writer.write_all(before.as_bytes())?;
            match part {
                Part::Text(text) => writer.write_all(text.as_bytes())?,
                Part::Data => serde_json::to_writer(EscapeLessThan(&mut writer), self.data()?)
                    .map_err(io::Error::other)?,
            }
            rest = after;
        }
        writer.write_all(rest.as_bytes())?;
        self.data.details = Vec::new();
        writer.flush()
    }
}

/// What takes a placeholder's place in the template.
enum Part {
    Text(&'static str),
    Data,
}

/// Writes JSON with every `<` (only ever inside a JSON string) as its escape, so that nothing
/// in the data can close the `<script>` element that holds it.
struct EscapeLessThan<W>(W);

impl<W: io::Write> io::Write for EscapeLessThan<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for (index, chunk) in buf.split(|&byte| byte == b'<').enumerate() {
            if index > 0 {
                self.0.write_all(b"\\u003c")?;
            }
            self.0.write_all(chunk)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A stall's mark on the timeline.
fn mark(id: usize, stall: &Stall) -> StallMark {
    let client = match (&stall.client.command, stall.client.sender()) {
        (_, Some(sender)) => format!("from {}", sender.addr),
        _ if stall.client.possible_senders() > 1 => {
            format!("from one of {} clients", stall.client.possible_senders())
        }
        _ => String::new(),
    };
    let waiting = match &stall.waiting {
        Some(waiting) if waiting.connections > 0 => super::waiting_text(waiting),
        Some(_) => "no client waiting".to_owned(),
        None => String::new(),
    };
    let accept = stall.accept.as_ref().map_or_else(String::new, |accept| {
        format!(
            "accept queue {}/{}, {} overflows, {} new connections",
            accept.max_queue, accept.limit, accept.overflows, accept.new_connections
        )
    });
    let madvise = if stall.madvise.calls > 0 {
        format!(
            "{} madvise calls, {} in {}",
            stall.madvise.calls,
            human_bytes(stall.madvise.bytes),
            human_duration_us(stall.madvise.us)
        )
    } else {
        String::new()
    };
    StallMark {
        id,
        instance: stall.instance.to_string(),
        t: epoch_seconds(stall.start),
        duration_us: stall.duration_us,
        duration: human_duration_us(stall.duration_us),
        origin: stall.origin.clone(),
        mechanism: stall.mechanism.clone(),
        on_cpu_us: stall.on_cpu_us,
        off_cpu_us: stall.off_cpu_us,
        runqueue_us: stall.runqueue_us,
        client,
        waiting,
        accept,
        madvise,
        incomplete: stall.incomplete,
    }
}

/// A stall's details: its breakdown and its flamegraph rooted at its origin.
fn detail(id: usize, stall: &Stall) -> io::Result<StallDetail> {
    let mut stacks = FoldedStacks::new(StackRoot::Origin);
    stacks.add_stall(stall);
    let mut svg = Vec::new();
    stacks.write_flamegraph(
        &format!(
            "{} stall of {} ({})",
            human_duration_us(stall.duration_us),
            stall.instance,
            stall.origin
        ),
        &mut svg,
    )?;
    Ok(StallDetail {
        id,
        breakdown: stall
            .breakdown
            .iter()
            .map(|entry| BreakdownRow {
                origin: entry.origin.clone(),
                mechanism: entry.mechanism.clone(),
                us: entry.us,
                share: entry.share,
            })
            .collect(),
        flamegraph: format!(
            "data:image/svg+xml;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(svg)
        ),
    })
}

/// Writes the HTML report to its file at each summary (whole, so the last one holds every
/// instance), created when the sink is so that an unwritable path fails before attaching.
pub struct HtmlSink {
    path: PathBuf,
    file: File,
    report: HtmlReport,
}

impl HtmlSink {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: create_output_file(path)?,
            report: HtmlReport::default(),
        })
    }
}

impl Sink for HtmlSink {
    fn attached(&mut self, attached: &Attached) -> io::Result<()> {
        self.report.add_attached(attached);
        Ok(())
    }
    fn stall(&mut self, stall: &Stall) -> io::Result<()> {
        self.report.add_stall(stall);
        Ok(())
    }
    fn accept_overflow(&mut self, overflow: &AcceptOverflow) -> io::Result<()> {
        self.report.add_overflow(overflow);
        Ok(())
    }
    fn interval(&mut self, report: &IntervalReport) -> io::Result<()> {
        self.report.add_interval(report);
        Ok(())
    }
    fn memory(&mut self, report: &MemoryReport) -> io::Result<()> {
        self.report.add_memory(report);
        Ok(())
    }
    fn connections(&mut self, census: &ConnectionCensus) -> io::Result<()> {
        self.report.add_connections(census);
        Ok(())
    }
    fn summary(&mut self, summary: &Summary) -> io::Result<()> {
        self.report.add_summary(summary);
        super::stacks::rewind(&mut self.file)?;
        self.report.write(&self.file)
    }
    fn reopen(&mut self) -> io::Result<()> {
        self.file = create_output_file(&self.path)?;
        Ok(())
    }
    fn describe(&self) -> String {
        format!("the HTML report `{}`", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real recording `report`'s tests read.
    const RECORDING: &str = include_str!("../../../fixtures/recording.jsonl");

    fn page_of(records: &str) -> String {
        let mut report = HtmlReport::default();
        for line in records.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            match value["type"].as_str().unwrap() {
                "attached" => report.add_attached(&serde_json::from_value(value).unwrap()),
                "stall" => report.add_stall(&serde_json::from_value(value).unwrap()),
                "memory" => report.add_memory(&serde_json::from_value(value).unwrap()),
                "connections" => report.add_connections(&serde_json::from_value(value).unwrap()),
                "summary" => report.add_summary(&serde_json::from_value(value).unwrap()),
                _ => {}
            }
        }
        let mut page = Vec::new();
        report.write(&mut page).unwrap();
        String::from_utf8(page).unwrap()
    }

    /// The JSON the page's script reads.
    fn data_of(page: &str) -> serde_json::Value {
        let start = page.find("id=\"report-data\">").unwrap() + "id=\"report-data\">".len();
        let end = start + page[start..].find("</script>").unwrap();
        serde_json::from_str(&page[start..end]).unwrap()
    }

    #[test]
    fn the_page_holds_every_stall_its_causes_with_advice_and_flamegraphs() {
        let page = page_of(RECORDING);
        let data = data_of(&page);
        let stalls = data["stalls"].as_array().unwrap();
        assert_eq!(stalls.len(), 6);
        assert!(stalls.iter().any(|stall| stall["origin"] == "command:keys"));
        let keys = data["causes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|cause| cause["origin"] == "command:keys")
            .unwrap();
        assert!(keys["advice"].as_str().unwrap().contains("SCAN"), "{keys}");
        let details = data["details"].as_array().unwrap();
        assert_eq!(details.len(), 6);
        let heaviest = stalls
            .iter()
            .max_by_key(|stall| stall["duration_us"].as_u64())
            .unwrap();
        assert_eq!(details[0]["id"], heaviest["id"]);
        assert!(
            details[0]["flamegraph"]
                .as_str()
                .unwrap()
                .starts_with("data:image/svg+xml;base64,")
        );
        assert_eq!(data["memory"].as_array().unwrap().len(), 1);
        assert_eq!(data["census"].as_array().unwrap().len(), 1);
        assert!(page.contains("Chart.js v4.6.1"));
        // The vendored script cannot close its own element.
        assert!(!CHART_JS.contains("</script"));
        assert!(page.contains("default-src 'none'"));
    }

    #[test]
    fn a_name_cannot_close_the_data_element_or_inject_markup() {
        let hostile = RECORDING.replace("command:keys", "</script><script>alert(1)</script>");
        let page = page_of(&hostile);
        assert_eq!(page.matches("<script>alert(1)").count(), 0);
        let data = data_of(&page);
        assert!(
            data["stalls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|stall| stall["origin"] == "</script><script>alert(1)</script>")
        );
    }

    #[test]
    fn a_server_whose_port_is_known_later_is_one_server() {
        let recording = RECORDING.replacen("\"port\":7001", "\"port\":null", 1);
        assert_ne!(recording, RECORDING);
        let data = data_of(&page_of(&recording));
        let instances = data["instances"].as_array().unwrap();
        assert_eq!(instances.len(), 1, "{instances:?}");
        assert_eq!(instances[0]["label"], "redis-server:7001 pid 1816");
        assert_eq!(instances[0]["summary"]["stopped"], "duration");
        assert!(
            data["stalls"]
                .as_array()
                .unwrap()
                .iter()
                .all(|stall| stall["instance"] == "redis-server:7001 pid 1816")
        );
    }

    #[test]
    fn a_long_run_is_bounded() {
        let stall_line = RECORDING
            .lines()
            .find(|line| line.contains("\"type\":\"stall\""))
            .unwrap();
        let stall: Stall = serde_json::from_str(stall_line).unwrap();
        let mut report = HtmlReport::default();
        for _ in 0..MAX_MARKS + 5 {
            report.add_stall(&stall);
        }
        let mut page = Vec::new();
        report.write(&mut page).unwrap();
        let data = data_of(std::str::from_utf8(&page).unwrap());
        assert_eq!(data["stalls"].as_array().unwrap().len(), MAX_MARKS);
        assert_eq!(data["left_out"]["stalls"], 5);
        assert_eq!(data["details"].as_array().unwrap().len(), MAX_DETAILED);
        assert!(page.len() < 8 << 20, "{} bytes", page.len());
    }
}
