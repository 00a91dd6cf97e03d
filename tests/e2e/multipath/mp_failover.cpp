// SPDX-License-Identifier: Apache-2.0
// mp_failover: multipath failover against real back-end processes. Starts one
// server process per path (any command, typically `uvd serve --rdma ...`
// exporting the same image), opens a multipath device over the paths, runs a
// continuous verified load (tests/e2e/multipath/mp_load.hpp) and then breaks
// the first path's server:
//   --fault kill   SIGKILL; I/O must go on through the other path; the server
//                  is started again and the path must fail back.
//   --fault stop   SIGSTOP (a silent path); I/O must go on through the other
//                  path; after failover (or a bound, if failover cannot finish
//                  while the server is frozen) SIGCONT; whatever the resumed
//                  server still held must not land over newer data.
//   --fault none   no fault (a baseline run).
// In the end every block of the working set is read back through the device
// and, after the servers exit, straight from the image file, and compared with
// the map of acknowledged writes. The outage (longest gap between two
// completions around the fault) and the failback are printed, and one line
//   RESULT key=value ...
// for scripts. Exit status 0 only when every check passed.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/registry.hpp"
#include "storage/multipath/multipath.hpp"
#include "storage/vstore.hpp"
#include "tests/e2e/multipath/mp_load.hpp"
#include "transports/builtin.hpp"

extern char** environ;

namespace uvd::test {
namespace {

using namespace std::chrono_literals;
using ms = std::chrono::milliseconds;

struct config {
  std::vector<std::string> paths;
  std::vector<std::string> servers;  // one command per path, or none at all
  std::string options = "check_interval=250ms&io_timeout=250ms";
  std::string fault = "kill";
  std::string image;  // checked directly at the end when set
  std::string logs = ".";
  load_options load;
  ms warm{2000};           // load before the fault
  ms after{3000};          // load on the surviving path after failover
  ms failover_max{10000};  // failover must finish within this (kill)
  ms stopped_max{6000};    // SIGCONT at the latest this long after SIGSTOP
  ms failback_max{20000};
  ms connect_max{90000};   // a server must accept within this (an ASan build under TCG is slow to start)
  ms deadline{240000};     // the whole run
};

const load_clock::time_point t_start = load_clock::now();  // NOLINT: set once, read only

double since_start() { return std::chrono::duration<double>(load_clock::now() - t_start).count(); }
double ms_of(std::chrono::microseconds d) { return static_cast<double>(d.count()) / 1000.0; }
double ms_between(load_clock::time_point a, load_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

void say(const std::string& s) {
  std::printf("[%8.3f] %s\n", since_start(), s.c_str());
  std::fflush(stdout);
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "mp_failover: %s\n"
               "usage: mp_failover --path URI --path URI [--server CMD --server CMD] [--fault kill|stop|none]\n"
               "  [--options 'check_interval=250ms&io_timeout=250ms&...'] [--image FILE] [--logs DIR]\n"
               "  [--blocks N] [--qd N] [--block-size N] [--warm-ms N] [--after-ms N] [--stopped-max-ms N]\n"
               "  [--failover-max-ms N] [--failback-max-ms N] [--connect-max-ms N] [--deadline-s N] [--seed N]\n",
               why);
  std::exit(2);
}

config parse(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage((a + " needs a value").c_str());
      return argv[++i];
    };
    auto num = [&]() { return std::stoull(val()); };
    if (a == "--path") c.paths.push_back(val());
    else if (a == "--server") c.servers.push_back(val());
    else if (a == "--options") c.options = val();
    else if (a == "--fault") c.fault = val();
    else if (a == "--image") c.image = val();
    else if (a == "--logs") c.logs = val();
    else if (a == "--blocks") c.load.blocks = num();
    else if (a == "--qd") c.load.queue_depth = static_cast<uint32_t>(num());
    else if (a == "--block-size") c.load.block_size = static_cast<uint32_t>(num());
    else if (a == "--seed") c.load.seed = num();
    else if (a == "--warm-ms") c.warm = ms(num());
    else if (a == "--after-ms") c.after = ms(num());
    else if (a == "--stopped-max-ms") c.stopped_max = ms(num());
    else if (a == "--failover-max-ms") c.failover_max = ms(num());
    else if (a == "--failback-max-ms") c.failback_max = ms(num());
    else if (a == "--connect-max-ms") c.connect_max = ms(num());
    else if (a == "--deadline-s") c.deadline = ms(num() * 1000);
    else usage(("unknown argument " + a).c_str());
  }
  if (c.paths.size() < 2) usage("two --path at least");
  if (!c.servers.empty() && c.servers.size() != c.paths.size()) usage("one --server per --path, or none");
  if (c.fault != "kill" && c.fault != "stop" && c.fault != "none") usage("--fault kill|stop|none");
  if (c.fault != "none" && c.servers.empty()) usage("a fault needs --server commands");
  if (c.load.queue_depth == 0 || c.load.blocks <= c.load.queue_depth) usage("--blocks must exceed --qd");
  return c;
}

// The server processes alive, for the watchdog.
struct live_pids {
  std::mutex mu;
  std::vector<pid_t> pids;
  void set(pid_t old_pid, pid_t new_pid) {
    std::lock_guard lk(mu);
    std::erase(pids, old_pid);
    if (new_pid > 0) pids.push_back(new_pid);
  }
  void kill_all() {
    std::lock_guard lk(mu);
    for (pid_t p : pids) ::kill(p, SIGKILL);
  }
};

// A back-end server process: `sh -c "exec CMD"`, output appended to a log.
struct server_proc {
  std::string name, cmd, log;
  pid_t pid = -1;
  live_pids* live = nullptr;

  bool start() {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    std::string line = "exec " + cmd;
    const char* argv[] = {"sh", "-c", line.c_str(), nullptr};
    int rc = posix_spawn(&pid, "/bin/sh", &fa, nullptr, const_cast<char**>(argv), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      say("cannot start server " + name + ": " + std::strerror(rc));
      pid = -1;
      return false;
    }
    live->set(-1, pid);
    say("server " + name + " started, pid " + std::to_string(pid) + ": " + cmd);
    return true;
  }
  // Sends sig; waits for the exit (up to `wait`) when reap is set.
  int signal(int sig, bool reap, ms wait = 10s) {
    if (pid <= 0) return -1;
    ::kill(pid, sig);
    if (!reap) return 0;
    auto until = load_clock::now() + wait;
    int st = 0;
    while (::waitpid(pid, &st, WNOHANG) == 0) {
      if (load_clock::now() > until) {
        say("server " + name + " did not exit after signal " + std::to_string(sig) + ": SIGKILL");
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &st, 0);
        break;
      }
      std::this_thread::sleep_for(10ms);
    }
    live->set(pid, -1);
    pid = -1;
    return st;
  }
  bool alive() {
    if (pid <= 0) return false;
    int st = 0;
    if (::waitpid(pid, &st, WNOHANG) == pid) {
      say("server " + name + " exited (status " + std::to_string(st) + "); its log:\n" + tail(40));
      live->set(pid, -1);
      pid = -1;
      return false;
    }
    return true;
  }
  std::string tail(size_t lines) const {
    std::ifstream f(log);
    std::vector<std::string> all;
    for (std::string l; std::getline(f, l);) all.push_back(l);
    std::string out;
    for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) out += "    | " + all[i] + "\n";
    return out;
  }
};

// Opens uri until it answers (the server may still be starting).
core::result<std::unique_ptr<storage::Vstore>> open_when_up(core::registry& reg, const std::string& uri,
                                                            const storage::open_options& oo, ms max,
                                                            server_proc* srv) {
  auto until = load_clock::now() + max;
  for (;;) {
    auto v = storage::Vstore::open(reg, uri, oo);
    if (v || load_clock::now() > until || (srv && !srv->alive())) return v;
    std::this_thread::sleep_for(100ms);
  }
}

std::string path_line(const storage::multipath_status& st) {
  std::string s = "epoch " + std::to_string(st.epoch) + ", failovers " + std::to_string(st.failovers) + ", reissued " +
                  std::to_string(st.reissued) + ", fences " + std::to_string(st.fences) + ";";
  for (size_t i = 0; i < st.paths.size(); ++i) {
    const auto& p = st.paths[i];
    s += " [" + std::string(1, static_cast<char>('A' + i)) + " " + storage::to_string(p.state) + " req=" +
         std::to_string(p.requests) + " err=" + std::to_string(p.errors) + " inflight=" + std::to_string(p.in_flight) +
         (p.abandoned ? " abandoned=" + std::to_string(p.abandoned) : "") +
         (p.reopens ? " reopens=" + std::to_string(p.reopens) : "") +
         (p.late_ok + p.late_refused ? " late_answered=" + std::to_string(p.late_ok) +
                                           " late_refused=" + std::to_string(p.late_refused)
                                     : "") +
         (p.last_error.empty() ? "" : " last_error='" + p.last_error + "'") + "]";
  }
  return s;
}

// Polls pred every 10 ms until it holds or max passes; true if it held.
template <class P>
bool wait_for(ms max, P pred) {
  auto until = load_clock::now() + max;
  while (!pred()) {
    if (load_clock::now() > until) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

int run(const config& c, core::registry* reg, live_pids& live) {
  ::signal(SIGPIPE, SIG_IGN);
  // Parsed as the multipath transport would parse its URI (paths included).
  std::string uri = storage::multipath_uri(c.paths, c.options);
  std::vector<std::string> parsed_paths;
  auto mo = storage::parse_multipath_options(uri.substr(uri.find('?') + 1), &parsed_paths);
  if (!mo) {
    say("bad --options: " + mo.err().what());
    return 2;
  }

  std::vector<server_proc> srv(c.servers.size());
  for (size_t i = 0; i < srv.size(); ++i) {
    srv[i].name = std::string(1, static_cast<char>('A' + i));
    srv[i].cmd = c.servers[i];
    srv[i].log = c.logs + "/server-" + srv[i].name + ".log";
    srv[i].live = &live;
    if (!srv[i].start()) return 1;
  }
  auto stop_servers = [&] {
    for (auto& s : srv)
      if (s.pid > 0) {
        ::kill(s.pid, SIGCONT);
        int st = s.signal(SIGTERM, true);
        say("server " + s.name + " stopped with SIGTERM, wait status " + std::to_string(st));
      }
  };

  std::vector<std::unique_ptr<storage::Vstore>> paths;
  storage::open_options po;
  po.queue_depth = mo->path_queue_depth;
  for (size_t i = 0; i < c.paths.size(); ++i) {
    auto v = open_when_up(*reg, c.paths[i], po, c.connect_max, srv.empty() ? nullptr : &srv[i]);
    if (!v) {
      say("path " + std::to_string(i + 1) + " (" + c.paths[i] + ") does not open: " + v.err().what());
      if (i < srv.size()) say("server log:\n" + srv[i].tail(40));
      stop_servers();
      return 1;
    }
    say("path " + std::string(1, static_cast<char>('A' + i)) + " open: " + c.paths[i] + " (" + (*v)->info().id +
        ", fence " + ((*v)->can_fence() ? "yes" : "no") + ")");
    paths.push_back(std::move(*v));
  }
  std::shared_ptr<storage::multipath_monitor> mon;
  storage::open_options mpo;
  mpo.queue_depth = c.load.queue_depth * 2;
  // A path whose server died is opened again from its URI (the rdma client does
  // not reconnect by itself): that is how a restarted server A fails back.
  auto dev = storage::open_multipath(std::move(paths), *mo, mpo, &mon, storage::path_reopen{reg, c.paths, po});
  if (!dev) {
    say("multipath does not open: " + dev.err().what());
    stop_servers();
    return 1;
  }
  auto status = [&] { return mon->status(); };
  say("multipath open (" + c.options + "): " + path_line(status()));
  if (c.load.blocks * c.load.block_size > (*dev)->size()) {
    say("the working set is larger than the device");
    stop_servers();
    return 2;
  }

  verified_load load(**dev, c.load);
  if (!load.prefill()) {
    say("cannot fill the working set: " + load.last_error());
    dev->reset();
    stop_servers();
    return 1;
  }
  say("working set written: " + std::to_string(c.load.blocks) + " blocks of " + std::to_string(c.load.block_size) +
      " bytes");
  load.start();
  std::this_thread::sleep_for(c.warm);
  // Break path A only while it carries the I/O and B is healthy in reserve (a slow
  // machine may have timed a path out during start-up; it returns at a health check).
  bool settled = wait_for(60s, [&] {
    auto s = status();
    uint64_t n = load.completions();
    std::this_thread::sleep_for(200ms);
    return s.paths[0].state == storage::path_state::active && s.paths[1].state != storage::path_state::failed &&
           load.completions() > n;
  });
  if (!settled) say("paths did not settle (A active, B healthy, I/O flowing) within 60 s");
  uint64_t warm_done = load.completions();
  say("warm-up: " + std::to_string(warm_done) + " completions; " + path_line(status()));
  bool ok = true;
  auto check = [&](bool cond, const std::string& what) {
    if (!cond) {
      ok = false;
      say("FAIL: " + what);
    }
    return cond;
  };
  check(warm_done > 0, "no I/O completed before the fault");

  std::ostringstream result;
  result << "RESULT fault=" << c.fault;
  if (c.fault != "none") {
    server_proc& a = srv[0];
    uint64_t b_before = status().paths[1].requests;
    auto t_fault = load_clock::now();
    uint64_t at_fault = load.completions();
    load.rewrite_in_flight();
    a.signal(c.fault == "kill" ? SIGKILL : SIGSTOP, c.fault == "kill");
    say(std::string(c.fault == "kill" ? "SIGKILL" : "SIGSTOP") + " server A");

    // Failover: I/O flows again, through B (not through A coming back by itself).
    auto failed_over = [&] {
      return status().paths[1].requests >= b_before + c.load.queue_depth &&
             load.completions() >= at_fault + 2ull * c.load.queue_depth;
    };
    ms bound = c.fault == "kill" ? c.failover_max : c.stopped_max;
    bool fo = wait_for(bound, failed_over);
    auto t_fo = load_clock::now();
    load_clock::time_point t_cont{};
    bool fo_while_stopped = fo;
    if (fo) {
      say("failover done " + std::to_string(static_cast<int>(ms_between(t_fault, t_fo))) + " ms after the fault; " +
          path_line(status()));
    } else {
      say("failover NOT done within " + std::to_string(bound.count()) + " ms; " + path_line(status()));
    }
    if (c.fault == "stop") {
      if (fo) std::this_thread::sleep_for(c.after);  // B serves, rewriting what A still holds
      t_cont = load_clock::now();
      ::kill(a.pid, SIGCONT);
      say("SIGCONT server A (stopped " + std::to_string(static_cast<int>(ms_between(t_fault, t_cont))) + " ms)");
      if (!fo) {
        fo = wait_for(c.failover_max, failed_over);
        t_fo = load_clock::now();
        say(fo ? "failover done " + std::to_string(static_cast<int>(ms_between(t_cont, t_fo))) + " ms after SIGCONT; " +
                     path_line(status())
               : "failover still not done " + std::to_string(c.failover_max.count()) + " ms after SIGCONT; " +
                     path_line(status()));
      }
    }
    check(fo, "failover did not complete");
    if (fo) {
      std::this_thread::sleep_for(c.after);  // the late requests of a resumed server run (or are refused) now
    }
    auto t_fault_end = load_clock::now();
    auto st = status();
    uint64_t b_gain = st.paths[1].requests - b_before;
    if (c.fault == "stop") {
      // What A held when it froze comes back now: refused by the fence, or
      // answered late for work done before the fence took (a write that
      // landed before A froze, its reply not yet sent). Which blocks hold
      // what is checked below, against every acknowledged write.
      wait_for(5s, [&] { return status().paths[0].abandoned == 0; });
      st = status();
      const auto& a_st = st.paths[0];
      say("server A's late requests: " + std::to_string(a_st.late_refused) + " refused, " +
          std::to_string(a_st.late_ok) + " answered, " + std::to_string(a_st.abandoned) + " not returned");
      result << " late_refused=" << a_st.late_refused << " late_answered=" << a_st.late_ok;
    }
    say("after failover: " + std::to_string(load.completions() - at_fault) + " completions since the fault, " +
        std::to_string(b_gain) + " requests on path B; " + path_line(st));
    check(b_gain > 0, "no request went to path B");
    // The fault's outage: the longest gap between completions from the fault until
    // I/O flowed through B. The whole phase may hold other gaps (a loaded machine
    // can time a path out for a moment); they are reported beside it.
    auto g = load.longest_gap(t_fault, fo ? t_fo : t_fault_end);
    auto gmax = load.longest_gap(t_fault - 500ms, t_fault_end);
    say("outage: longest gap between completions " + std::to_string(ms_of(g.length)) + " ms, starting " +
        std::to_string(static_cast<int>(ms_between(t_fault, g.start))) + " ms after the fault; longest gap " +
        "in the whole phase " + std::to_string(ms_of(gmax.length)) + " ms, starting " +
        std::to_string(static_cast<int>(ms_between(t_fault, gmax.start))) + " ms after the fault");
    result << " outage_ms=" << ms_of(g.length) << " phase_max_gap_ms=" << ms_of(gmax.length)
           << " failover=" << (fo ? "yes" : "no");
    if (c.fault == "stop")
      result << " failover_while_stopped=" << (fo_while_stopped ? "yes" : "no")
             << " stopped_ms=" << static_cast<int>(ms_between(t_fault, t_cont))
             << " failover_after_sigcont_ms=" << (fo_while_stopped ? 0 : static_cast<int>(ms_between(t_cont, t_fo)));

    // Failback: a killed server is started again; a resumed one may return by itself.
    auto t_back = load_clock::now();
    if (c.fault == "kill") {
      if (a.start()) {
        auto probe = open_when_up(*reg, c.paths[0], {}, c.connect_max, &a);
        say(probe ? "server A answers again" : "server A does not answer: " + probe.err().what());
      }
    }
    uint64_t a_before = status().paths[0].requests;
    bool fb = wait_for(c.failback_max, [&] {
      auto s = status();
      return s.paths[0].state == storage::path_state::active && s.paths[0].requests > a_before + c.load.queue_depth;
    });
    auto t_fb = load_clock::now();
    say(fb ? "failback: path A active again and carrying I/O " +
                 std::to_string(static_cast<int>(ms_between(t_back, t_fb))) + " ms after it came back; " +
                 path_line(status())
           : "no failback within " + std::to_string(c.failback_max.count()) + " ms; " + path_line(status()));
    if (c.fault == "kill") check(fb, "path A did not fail back after its server was started again");
    if (fb) std::this_thread::sleep_for(500ms);
    auto gb = load.longest_gap(t_back, load_clock::now());
    result << " failback=" << (fb ? "yes" : "no") << " failback_ms=" << (fb ? ms_between(t_back, t_fb) : -1.0)
           << " failback_gap_ms=" << ms_of(gb.length);
  } else {
    std::this_thread::sleep_for(c.after);
    auto g = load.longest_gap(t_start, load_clock::now());
    result << " longest_gap_ms=" << ms_of(g.length);
  }

  load.stop();
  say("load stopped: " + std::to_string(load.completions()) + " completions, " + std::to_string(load.writes_acked()) +
      " writes acknowledged, " + std::to_string(load.reads_checked()) + " reads verified, " +
      std::to_string(load.errors()) + " errors" + (load.errors() ? " (last: " + load.last_error() + ")" : ""));
  check(load.errors() == 0, "requests failed during the run");
  for (auto& p : load.problems()) say("  " + p);
  check(load.problems().empty(), "reads during the run returned wrong data");

  auto v1 = load.verify_device(**dev);
  for (auto& p : v1) say("  " + p);
  check(v1.empty(), "re-reading every block through the device found wrong data");
  say("re-read " + std::to_string(c.load.blocks) + " blocks through the device: " +
      std::to_string(v1.size()) + " problems");
  if (auto f = (*dev)->flush(); !f) check(false, "flush: " + f.err().what());
  auto final_status = status();
  dev->reset();
  say("device closed; " + path_line(final_status));
  stop_servers();
  for (auto& s : srv) say("server " + s.name + " log (tail):\n" + s.tail(15));

  size_t image_problems = 0;
  if (!c.image.empty()) {
    auto v2 = load.verify_image(c.image);
    for (auto& p : v2) say("  " + p);
    image_problems = v2.size();
    check(v2.empty(), "the image file does not hold every acknowledged write");
    say("checked " + std::to_string(c.load.blocks) + " blocks of " + c.image + " directly: " +
        std::to_string(v2.size()) + " problems");
  }
  result << " errors=" << load.errors() << " bad_reads=" << load.problems().size() << " bad_blocks=" << v1.size()
         << " bad_image_blocks=" << image_problems << " writes=" << load.writes_acked()
         << " reads=" << load.reads_checked() << " epoch=" << final_status.epoch
         << " fences=" << final_status.fences << " reissued=" << final_status.reissued
         << " options=" << c.options << " status=" << (ok ? "pass" : "FAIL");
  std::printf("%s\n", result.str().c_str());
  say(ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace uvd::test

int main(int argc, char** argv) {
  auto c = uvd::test::parse(argc, argv);
  uvd::test::live_pids live;
  // A hang (a fence that never returns, a device that never closes) ends the
  // run with a message instead of leaving the harness to time out silently.
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  std::thread watchdog([&] {
    std::unique_lock lk(mu);
    if (!cv.wait_for(lk, c.deadline, [&] { return finished; })) {
      std::printf("mp_failover: deadline of %lld s passed; giving up\nRESULT fault=%s status=FAIL deadline=1\n",
                  static_cast<long long>(c.deadline.count() / 1000), c.fault.c_str());
      std::fflush(stdout);
      live.kill_all();
      std::_Exit(3);
    }
  });
  // The registry (and the plugins it loaded) lives until the process exits, as in `uvd
  // serve`: unloading the rdma plugin would unload librdmacm, whose process-wide state
  // (device list, verbs contexts) is never freed and would then show up as leaks.
  auto reg = uvd::transports::make_default_registry();
  int rc = uvd::test::run(c, reg.get(), live);
  {
    std::lock_guard lk(mu);
    finished = true;
  }
  cv.notify_all();
  watchdog.join();
  std::exit(rc);  // without destroying reg
}
