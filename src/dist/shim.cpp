// C interface between `crate::dist` and libtorch's c10d (the engine behind torch.distributed).
//
// One handle = one process group of the run: a TCPStore (rank 0 hosts it unless torchrun's agent
// does), a gloo backend for CPU tensors and, when the shim was built with NCCL and a CUDA tensor
// comes along, an NCCL backend created on first use. Every entry point catches what c10d throws
// and returns the message as a malloc'd string (NULL on success) for Rust to turn into an error.
//
// Losing a peer: each rank bumps a heartbeat counter in the store every second from a thread of
// its own and watches the others' counters. When a collective fails, the failing rank looks at
// the heartbeats to say which rank is gone; when a peer's heartbeat stays still for the peer
// timeout while this rank may be blocked in a collective that will never finish (a host that
// vanished without closing its sockets), the watchdog prints the lost rank and ends the process.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifdef STIC_WITH_NCCL
// Defined in shim_nccl.cpp, which is compiled against the CUDA and NCCL headers.
c10::intrusive_ptr<c10d::Backend> stic_make_nccl_backend(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world,
    std::chrono::milliseconds timeout);
#endif

namespace {

using Clock = std::chrono::steady_clock;
using ms = std::chrono::milliseconds;

constexpr ms kBeat{1000};
// A heartbeat value is state * kStateUnit + beats: one atomic `add` both beats and changes state.
constexpr int64_t kStateUnit = 1000000000000000LL;
enum PeerState : int64_t { kRunning = 0, kFinishing = 1, kFailed = 2 };

char* dup(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Drops trailing blanks and gloo's leading "[source/file.cc:123] ".
std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) {
    s.pop_back();
  }
  if (!s.empty() && s[0] == '[') {
    auto end = s.find("] ");
    if (end != std::string::npos && s.rfind(':', end) != std::string::npos && s.find(' ') > end) {
      s = s.substr(end + 2);
    }
  }
  return s;
}

// What an exception says, without the C++ backtrace that c10::Error carries.
std::string describe(std::exception_ptr eptr) {
  try {
    std::rethrow_exception(eptr);
  } catch (const c10::Error& e) {
    return trim(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return trim(e.what());
  } catch (...) {
    return "unknown C++ exception";
  }
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::ostringstream out;
  out << (ranks.size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < ranks.size(); ++i) {
    out << (i == 0 ? "" : (i + 1 == ranks.size() ? " and " : ", ")) << ranks[i];
  }
  return out.str();
}

std::string hb_key(int rank) {
  return "hb/" + std::to_string(rank);
}

} // namespace

struct stic_pg {
  int rank = 0;
  int world = 1;
  bool store_host = false; // this process runs the TCPStore server
  std::string endpoint; // host:port, for messages
  ms timeout{0};
  ms peer_timeout{0};
  c10::intrusive_ptr<c10d::Store> store; // prefixed; used by the calling thread only
  c10::intrusive_ptr<c10d::Backend> gloo;
  c10::intrusive_ptr<c10d::Backend> nccl;

  // Heartbeat thread.
  c10::intrusive_ptr<c10d::Store> hb_store; // its own connection, so that it never waits behind the caller
  std::thread hb_thread;
  std::mutex hb_mutex;
  std::condition_variable hb_cv;
  bool hb_stop = false;
  std::atomic<bool> watching{true};
  PeerState state = kRunning; // as published in this rank's heartbeat value

  // Reads every rank's heartbeat value; throws when the store cannot be reached.
  static std::vector<int64_t> read_beats(c10d::Store& store, int world) {
    std::vector<std::string> keys;
    for (int r = 0; r < world; ++r) {
      keys.push_back(hb_key(r));
    }
    std::vector<int64_t> out;
    for (const auto& bytes : store.multiGet(keys)) {
      out.push_back(std::stoll(std::string(bytes.begin(), bytes.end())));
    }
    return out;
  }

  std::string lost_store_message(const std::string& why) const {
    if (store_host) {
      return "the rendezvous store this rank hosts failed (" + why + ")";
    }
    const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    if (agent != nullptr && std::string(agent) == "True") {
      return "lost contact with torchrun's rendezvous store at " + endpoint + " (" + why + ")";
    }
    return "rank 0 lost contact with the group (the rendezvous store it hosts at " + endpoint +
        " stopped answering: " + why + ")";
  }

  void heartbeat_loop() {
    std::vector<int64_t> seen(world, -1);
    std::vector<Clock::time_point> changed(world, Clock::now());
    int store_failures = 0;
    std::unique_lock<std::mutex> lock(hb_mutex);
    while (!hb_stop) {
      lock.unlock();
      std::string fatal;
      try {
        hb_store->add(hb_key(rank), 1);
        auto beats = read_beats(*hb_store, world);
        store_failures = 0;
        auto now = Clock::now();
        std::vector<int> lost;
        for (int r = 0; r < world; ++r) {
          if (beats[r] != seen[r]) {
            seen[r] = beats[r];
            changed[r] = now;
          } else if (r != rank && beats[r] / kStateUnit == kRunning && now - changed[r] > peer_timeout) {
            lost.push_back(r);
          }
        }
        if (!lost.empty()) {
          fatal = join_ranks(lost) + " lost contact with the group (no heartbeat for " +
              std::to_string(peer_timeout.count() / 1000) + " s)";
        }
      } catch (...) {
        // A store that stays unreachable for several beats is gone, and with it (unless torchrun
        // hosts it) rank 0.
        if (++store_failures >= 3) {
          fatal = lost_store_message(describe(std::current_exception()));
        }
      }
      if (!fatal.empty() && watching.load()) {
        std::fprintf(
            stderr,
            "error: distributed run: rank %d of %d: %s; stopping this rank\n",
            rank,
            world,
            fatal.c_str());
        std::fflush(stderr);
        std::_Exit(2);
      }
      lock.lock();
      hb_cv.wait_for(lock, kBeat, [this] { return hb_stop; });
    }
  }

  void stop_heartbeat() {
    {
      std::lock_guard<std::mutex> guard(hb_mutex);
      hb_stop = true;
    }
    hb_cv.notify_all();
    if (hb_thread.joinable()) {
      hb_thread.join();
    }
  }

  // Best-effort change of this rank's state as the other ranks see it.
  void set_state(PeerState to) {
    try {
      store->add(hb_key(rank), (to - state) * kStateUnit);
      state = to;
    } catch (...) {
    }
  }

  // Explains a failed collective: which ranks stopped beating, or that none did.
  std::string explain(const std::string& op, const std::string& cause) {
    std::vector<int64_t> first;
    try {
      first = read_beats(*store, world);
    } catch (...) {
      return op + " failed: " + lost_store_message(describe(std::current_exception())) + "; the collective said: " + cause;
    }
    std::vector<bool> alive(world, false);
    alive[rank] = true;
    std::vector<int> failed;
    for (int r = 0; r < world; ++r) {
      if (first[r] / kStateUnit == kFailed) {
        failed.push_back(r);
        alive[r] = true;
      }
    }
    // Three beats: a live rank's counter moves in that time.
    auto deadline = Clock::now() + 3 * kBeat;
    while (Clock::now() < deadline) {
      std::this_thread::sleep_for(ms(200));
      std::vector<int64_t> now;
      try {
        now = read_beats(*store, world);
      } catch (...) {
        return op + " failed: " + lost_store_message(describe(std::current_exception())) + "; the collective said: " + cause;
      }
      bool all = true;
      for (int r = 0; r < world; ++r) {
        alive[r] = alive[r] || now[r] != first[r];
        all = all && alive[r];
      }
      if (all) {
        break;
      }
    }
    std::vector<int> lost;
    for (int r = 0; r < world; ++r) {
      if (!alive[r]) {
        lost.push_back(r);
      }
    }
    if (!lost.empty()) {
      return op + " failed: " + join_ranks(lost) + " lost contact with the group (" +
          (lost.size() == 1 ? "its heartbeat" : "their heartbeats") + " stopped; " + cause + ")";
    }
    if (!failed.empty()) {
      return op + " failed: " + join_ranks(failed) + " stopped with an error (see " +
          (failed.size() == 1 ? "its" : "their") + " output; " + cause + ")";
    }
    return op + " failed although every rank is still alive: " + cause +
        " (a timeout here means a rank is stuck or the ranks ran different collectives)";
  }

  c10d::Backend& backend_for(const at::Tensor& t) {
#ifdef STIC_WITH_NCCL
    if (t.is_cuda()) {
      if (!nccl) {
        // Local: ProcessGroupNCCL exchanges its unique id through the store at the first collective.
        nccl = stic_make_nccl_backend(
            c10::make_intrusive<c10d::PrefixStore>("nccl", store), rank, world, timeout);
      }
      return *nccl;
    }
#endif
    return *gloo;
  }

  const char* backend_name(const at::Tensor& t) const {
#ifdef STIC_WITH_NCCL
    if (t.is_cuda()) {
      return "nccl";
    }
#endif
    (void)t;
    return "gloo";
  }
};

namespace {

template <typename F>
char* guarded(stic_pg* pg, const std::string& op, F&& body) {
  std::exception_ptr failure;
  try {
    body();
    return nullptr;
  } catch (...) {
    failure = std::current_exception();
  }
  try {
    return dup(pg->explain(op, describe(failure)));
  } catch (...) {
    return dup(op + " failed: " + describe(failure));
  }
}

// Runs `collective` on a contiguous view of `*tensor`, copying back when a copy had to be made.
template <typename F>
void on_contiguous(const at::Tensor& tensor, F&& collective) {
  std::vector<at::Tensor> tensors{tensor.is_contiguous() ? tensor : tensor.contiguous()};
  collective(tensors);
  if (!tensor.is_same(tensors[0])) {
    tensor.copy_(tensors[0]);
  }
}

} // namespace

extern "C" {

int stic_dist_has_nccl() {
#ifdef STIC_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

void stic_dist_free_string(char* s) {
  std::free(s);
}

// Joins the group: connects to (or, when `store_host`, runs) the TCPStore at host:port, waits up to
// `join_timeout_ms` for all `world` ranks to check in, starts the heartbeat and creates the gloo
// backend. `ifnames` (comma-separated, may be empty) picks gloo's network interfaces; otherwise
// gloo binds to `bind_host`, or to this machine's hostname when that is empty.
stic_pg* stic_dist_init(
    const char* host,
    int port,
    int rank,
    int world,
    int store_host,
    const char* key_prefix,
    const char* ifnames,
    const char* bind_host,
    int64_t timeout_ms,
    int64_t join_timeout_ms,
    int64_t peer_timeout_ms,
    char** error) {
  *error = nullptr;
  if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
    // c10d logs each failed store operation as a warning with a C++ backtrace; the shim reports those
    // failures itself, in one line. TORCH_CPP_LOG_LEVEL brings them back.
    FLAGS_caffe2_log_level = 2; // ERROR
  }
  auto pg = std::make_unique<stic_pg>();
  pg->rank = rank;
  pg->world = world;
  pg->store_host = store_host != 0;
  pg->endpoint = std::string(host) + ":" + std::to_string(port);
  pg->timeout = ms(timeout_ms);
  pg->peer_timeout = ms(peer_timeout_ms);
  std::string stage = "connecting to the rendezvous store at " + pg->endpoint;
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = pg->store_host;
    opts.numWorkers = world;
    opts.waitWorkers = false; // the roll call below names the ranks that do not come
    opts.timeout = ms(join_timeout_ms);
    opts.multiTenant = true;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, opts);
    pg->store = c10::make_intrusive<c10d::PrefixStore>(key_prefix, tcp);

    stage = "waiting for the other ranks at " + pg->endpoint;
    pg->store->add(hb_key(rank), 1);
    std::vector<std::string> keys;
    for (int r = 0; r < world; ++r) {
      keys.push_back(hb_key(r));
    }
    auto deadline = Clock::now() + ms(join_timeout_ms);
    while (!pg->store->check(keys)) {
      if (Clock::now() > deadline) {
        std::vector<int> missing;
        for (int r = 0; r < world; ++r) {
          if (!pg->store->check({hb_key(r)})) {
            missing.push_back(r);
          }
        }
        *error = dup(
            join_ranks(missing) + " did not join the group at " + pg->endpoint + " within " +
            std::to_string(join_timeout_ms / 1000) + " s (STIC_DIST_JOIN_TIMEOUT)");
        return nullptr;
      }
      std::this_thread::sleep_for(ms(50));
    }

    stage = "starting the heartbeat";
    auto hb_tcp = tcp->clone();
    hb_tcp->setTimeout(std::max(ms(peer_timeout_ms), ms(5000)));
    pg->hb_store = c10::make_intrusive<c10d::PrefixStore>(key_prefix, hb_tcp);
    pg->hb_thread = std::thread([raw = pg.get()] { raw->heartbeat_loop(); });

    stage = "creating the gloo process group";
    auto gloo_opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
    std::string names(ifnames);
    if (!names.empty()) {
      std::stringstream list(names);
      std::string name;
      while (std::getline(list, name, ',')) {
        if (!name.empty()) {
          gloo_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
        }
      }
    } else if (bind_host[0] != '\0') {
      gloo_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind_host));
    } else {
      gloo_opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    pg->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", pg->store), rank, world, gloo_opts);
    return pg.release();
  } catch (...) {
    std::string why = describe(std::current_exception());
    pg->stop_heartbeat();
    if (pg->store && !pg->hb_store && !pg->store_host) {
      // The store answered once and then went away while the ranks were checking in.
      *error = dup(stage + " failed: " + pg->lost_store_message(why));
      return nullptr;
    }
    if (pg->store && pg->hb_store) {
      try {
        *error = dup(pg->explain(stage, why));
        return nullptr;
      } catch (...) {
      }
    }
    *error = dup(stage + " failed: " + why);
    return nullptr;
  }
}

const char* stic_dist_backend_name(stic_pg* pg, const void* tensor) {
  return pg->backend_name(*static_cast<const at::Tensor*>(tensor));
}

char* stic_dist_all_reduce_sum(stic_pg* pg, const void* tensor) {
  return guarded(pg, "all-reduce", [&] {
    const at::Tensor& t = *static_cast<const at::Tensor*>(tensor);
    auto& backend = pg->backend_for(t);
    on_contiguous(t, [&](std::vector<at::Tensor>& ts) {
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      backend.allreduce(ts, opts)->wait();
    });
  });
}

char* stic_dist_broadcast(stic_pg* pg, const void* tensor, int root) {
  return guarded(pg, "broadcast from rank " + std::to_string(root), [&] {
    const at::Tensor& t = *static_cast<const at::Tensor*>(tensor);
    auto& backend = pg->backend_for(t);
    on_contiguous(t, [&](std::vector<at::Tensor>& ts) {
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      backend.broadcast(ts, opts)->wait();
    });
  });
}

char* stic_dist_barrier(stic_pg* pg) {
  return guarded(pg, "barrier", [&] { pg->gloo->barrier(c10d::BarrierOptions())->wait(); });
}

// Orderly end: tells the others this rank is finishing (so that its silence is not taken for a
// loss), waits for every rank to get here, then stops the heartbeat. Call once, then destroy.
char* stic_dist_finish(stic_pg* pg) {
  pg->set_state(kFinishing);
  pg->watching.store(false);
  char* err = stic_dist_barrier(pg);
  pg->stop_heartbeat();
  return err;
}

// Frees the handle. `failed`: this rank is stopping on an error (the others are told, so that they
// report it as such instead of as a lost rank).
void stic_dist_destroy(stic_pg* pg, int failed) {
  if (pg == nullptr) {
    return;
  }
  if (failed != 0) {
    pg->set_state(kFailed);
  }
  pg->watching.store(false);
  pg->stop_heartbeat();
  try {
    pg->nccl.reset();
    pg->gloo.reset();
    pg->hb_store.reset();
    pg->store.reset();
  } catch (...) {
  }
  delete pg;
}

} // extern "C"
