"""A write workload for the crash tests: python crash_writer.py MOUNTPOINT MANIFEST SEED.

Each round writes a new file of random content in a random subdirectory, fsyncs it and only then
appends "name sha256" to MANIFEST (outside the volume), so MANIFEST lists exactly the files whose
fsync returned. Between those it rewrites, appends to, truncates, renames and deletes other files
without fsync, to leave plenty of unsynced state for the crash. It stops by itself after 5,000
rounds or 120 seconds, and at the first I/O error (the crash).
"""

import hashlib
import os
import random
import sys
import time

mountpoint, manifest_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
deadline = time.monotonic() + 120
noise: list[str] = []

with open(manifest_path, "a") as manifest:
    for round_number in range(5000):
        if time.monotonic() > deadline:
            break
        directory = f"d{rng.randrange(8)}"
        os.makedirs(os.path.join(mountpoint, directory), exist_ok=True)
        name = f"{directory}/synced-{round_number:05d}"
        data = rng.randbytes(rng.choice([1, 4095, 65536, 65537, 200_000, 700_000]))
        with open(os.path.join(mountpoint, name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        manifest.write(f"{name} {hashlib.sha256(data).hexdigest()}\n")
        manifest.flush()

        for _ in range(3):
            action = rng.choice(["new", "append", "truncate", "rename", "delete"])
            if action == "new" or not noise:
                noise_name = f"{directory}/noise-{round_number:05d}-{rng.randrange(10**6)}"
                with open(os.path.join(mountpoint, noise_name), "wb") as f:
                    f.write(rng.randbytes(rng.randrange(1, 300_000)))
                noise.append(noise_name)
                continue
            target = rng.choice(noise)
            path = os.path.join(mountpoint, target)
            if action == "append":
                with open(path, "ab") as f:
                    f.write(rng.randbytes(rng.randrange(1, 100_000)))
            elif action == "truncate":
                os.truncate(path, rng.randrange(0, 200_000))
            elif action == "rename":
                renamed = target + "r"
                os.rename(path, os.path.join(mountpoint, renamed))
                noise[noise.index(target)] = renamed
            else:
                os.unlink(path)
                noise.remove(target)
