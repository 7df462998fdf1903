"""Datasets: Moving Shapes text-video world, video files and folders (UDA's image data is in omniar.uda.data)."""

from .shapes import HELDOUT, MovingShapes
from .skipped import DataWarning
from .video_folder import VideoFolderDataset
from .video_io import mp4_writer, read_video, video_fps, video_info, write_video

__all__ = ["HELDOUT", "DataWarning", "MovingShapes", "VideoFolderDataset", "mp4_writer", "read_video", "video_fps",
           "video_info", "write_video"]
