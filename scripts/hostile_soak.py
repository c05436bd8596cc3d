#!/usr/bin/env python3
"""`make soak`: a running `softprompt serve` (its default limits) under hostile traffic.

For DURATION seconds, beside ordinary classify traffic at half the capacity measured first:
  * amplified requests: 1,000 adapter names and 64 long inputs in one small body, 1 MB bodies;
  * 50 slow uploads, a byte of body every two seconds;
  * 20 half-sent headers, never finished;
  * generations abandoned mid-way: streams read for a moment and closed, plain ones closed early.
Then SIGTERM. Passes when every ordinary request got 200, the server's peak RSS stayed under
2 GB, it never answered a 5xx but 504, and it exited within 10 s of SIGTERM.

Usage: hostile_soak.py --pid PID --url URL --classify ADAPTER --generate ADAPTER --data TSV
       [--duration 600]
Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import signal
import socket
import threading
import time
import urllib.parse

p = argparse.ArgumentParser()
p.add_argument("--pid", type=int, required=True)
p.add_argument("--url", required=True)
p.add_argument("--classify", required=True)
p.add_argument("--generate", required=True)
p.add_argument("--data", required=True)
p.add_argument("--duration", type=float, default=600)
args = p.parse_args()
host, port = urllib.parse.urlsplit(args.url).hostname, urllib.parse.urlsplit(args.url).port
texts = [line.split("\t")[0] for line in open(args.data, encoding="utf-8").read().splitlines()[1:]]
stop = threading.Event()
# set at SIGTERM: no new ordinary requests from then on (those in flight must still succeed), while
# the hostile connections stay open through the shutdown
draining = threading.Event()
lock = threading.Lock()
tally = {}


def count(kind, outcome):
    with lock:
        tally.setdefault(kind, {}).setdefault(str(outcome), 0)
        tally[kind][str(outcome)] += 1


def request(method, path, body, timeout=60):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ordinary_once():
    body = json.dumps({"adapter": args.classify, "inputs": [random.choice(texts)]})
    try:
        status, _ = request("POST", "/v1/classify", body)
    except Exception as e:  # a refused or reset connection is a failure too
        status = type(e).__name__
    count("ordinary", status)
    return status


def capacity(seconds=20, concurrency=8):
    """Ordinary requests per second the server answers alone."""
    done = []
    deadline = time.time() + seconds

    def worker():
        while time.time() < deadline:
            if ordinary_once() == 200:
                done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return len(done) / seconds


def ordinary(rate):
    """Open-loop: one request every 1/rate s, each on its own thread."""
    next_at = time.time()
    while not draining.is_set():
        threading.Thread(target=ordinary_once, daemon=True).start()
        next_at += random.expovariate(rate)
        time.sleep(max(0.0, next_at - time.time()))


def amplified():
    """Small bodies that would cost many backbone passes, and bodies past the size limit."""
    long_text = " ".join(texts[:20])
    classify = [
        {"adapters": [args.classify] * 1000, "inputs": [texts[0]] * 64},
        {"adapter": args.classify, "inputs": [long_text] * 64},
        {"adapter": args.classify, "inputs": ["word " * 200_000]},
        {"adapter": args.classify, "inputs": ["x" * (2 << 20)]},
    ]
    generate = {"adapter": args.generate, "input": "a " * 50_000, "max_new_tokens": 100000}
    while not stop.is_set():
        for path, body in [("/v1/classify", random.choice(classify)), ("/v1/generate", generate)]:
            try:
                status, _ = request("POST", path, json.dumps(body))
                count("amplified", status)
            except Exception as e:
                count("amplified", type(e).__name__)
            time.sleep(0.5)


def slow_upload():
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
            s.settimeout(2)
            answer = b""
            while not stop.is_set():
                try:
                    s.sendall(b" ")
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                    if b"\r\n\r\n" in answer:
                        break
                except socket.timeout:
                    continue
            count("slow_upload", answer[9:12].decode() or "closed")
            s.close()
        except OSError as e:
            count("slow_upload", type(e).__name__)
            time.sleep(1)


def half_header():
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Never-Ends: ")
            s.settimeout(1)
            while not stop.is_set():
                try:
                    if not s.recv(4096):
                        break
                except socket.timeout:
                    continue
            count("half_header", "closed by server" if not stop.is_set() else "held to the end")
            s.close()
        except OSError as e:
            count("half_header", type(e).__name__)
            time.sleep(1)


def abandoned_generation():
    while not stop.is_set():
        stream = random.random() < 0.5
        body = json.dumps({"adapter": args.generate, "input": random.choice(texts)[:200],
                           "max_new_tokens": 200, "stream": stream}).encode()
        try:
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(random.uniform(0.2, 1.5))
            if stream:
                s.recv(256)
            s.close()
            count("abandoned_generation", "stream" if stream else "plain")
        except OSError as e:
            count("abandoned_generation", type(e).__name__)
        time.sleep(0.5)


def rss_mb(field):
    for line in open(f"/proc/{args.pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


rate = capacity() / 2
print(f"capacity alone: {2 * rate:.1f} requests/s; ordinary traffic at {rate:.1f}/s", flush=True)
tally.clear()
threads = [threading.Thread(target=ordinary, args=(rate,))]
threads += [threading.Thread(target=amplified)]
threads += [threading.Thread(target=slow_upload) for _ in range(50)]
threads += [threading.Thread(target=half_header) for _ in range(20)]
threads += [threading.Thread(target=abandoned_generation)]
for t in threads:
    t.daemon = True
    t.start()
start = time.time()
while time.time() - start < args.duration:
    time.sleep(min(60, args.duration - (time.time() - start)))
    print(f"{time.time() - start:5.0f} s: RSS {rss_mb('VmRSS'):.0f} MB, peak {rss_mb('VmHWM'):.0f} MB, "
          f"{json.dumps(tally)}", flush=True)
peak = rss_mb("VmHWM")
# the hostile connections stay open through the shutdown: they must not hold it
draining.set()
time.sleep(0.2)  # the last ordinary requests started are connected by now
asked = time.time()
os.kill(args.pid, signal.SIGTERM)
while os.path.exists(f"/proc/{args.pid}") and time.time() - asked < 60:
    try:
        if open(f"/proc/{args.pid}/stat").read().split()[2] == "Z":
            break
    except OSError:
        break
    time.sleep(0.05)
exit_s = time.time() - asked
stop.set()
time.sleep(1)
ordinary_counts = tally.get("ordinary", {})
failed = {k: v for k, v in ordinary_counts.items() if k != "200"}
server_errors = {k: {s: n for s, n in v.items() if s.startswith("5") and s != "504"} for k, v in tally.items()}
server_errors = {k: v for k, v in server_errors.items() if v}
print(json.dumps({"duration_s": args.duration, "ordinary_rate_per_s": rate, "tally": tally,
                  "peak_rss_mb": peak, "sigterm_to_exit_s": round(exit_s, 2)}, indent=1))
problems = []
if failed:
    problems.append(f"ordinary requests failed: {failed}")
if peak >= 2048:
    problems.append(f"peak RSS {peak:.0f} MB")
if exit_s >= 10:
    problems.append(f"SIGTERM took {exit_s:.1f} s")
if server_errors:
    problems.append(f"5xx answers: {server_errors}")
print("PASS" if not problems else "FAIL: " + "; ".join(problems))
raise SystemExit(1 if problems else 0)
