"""Datasets: Moving Shapes text-video world, video files and folders, image domains and digits for UDA."""

from .digits import HandwrittenDigits, PrintedCharacters
from .shapes import HELDOUT, MovingShapes
from .skipped import DataWarning
from .video_folder import VideoFolderDataset
from .video_io import read_video, video_fps, video_info, write_video

__all__ = ["HELDOUT", "DataWarning", "HandwrittenDigits", "MovingShapes", "PrintedCharacters", "VideoFolderDataset",
           "read_video", "video_fps", "video_info", "write_video"]
