//! gRPC → manager commands. Handlers translate and forward; they own no state.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::pb::{self, agent_server::Agent};
use gpuchaos_proto::spec::FaultSpec;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::error::AgentError;
use crate::inventory::Inventory;
use crate::manager::{Command, ManagerHandle};

pub struct AgentService {
    pub manager: ManagerHandle,
    pub inventory: Arc<Inventory>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::FaultEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        let (active, sessions) = self.manager.call(|reply| Command::Counts { reply }).await?;
        let mut info = self.inventory.snapshot();
        info.active_faults = active;
        info.open_sessions = sessions;
        Ok(Response::new(info))
    }

    async fn open_session(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let r = req.into_inner();
        let ttl = Duration::from_millis(r.lease_ttl_ms);
        let s = self
            .manager
            .call(|reply| Command::OpenSession {
                ttl,
                holder: r.holder,
                lock: r.lock,
                reply,
            })
            .await??;
        Ok(Response::new(s))
    }

    async fn renew_session(
        &self,
        req: Request<pb::RenewSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = req.into_inner().session_id;
        let s = self
            .manager
            .call(|reply| Command::RenewSession {
                id,
                at: tokio::time::Instant::now(),
                reply,
            })
            .await??;
        Ok(Response::new(s))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let r = req.into_inner();
        let reverted = self
            .manager
            .call(|reply| Command::CloseSession {
                id: r.session_id,
                keep_faults: r.keep_faults,
                reply,
            })
            .await??;
        Ok(Response::new(pb::CloseSessionResponse { reverted }))
    }

    async fn inject(&self, req: Request<pb::InjectRequest>) -> Result<Response<pb::Fault>, Status> {
        let r = req.into_inner();
        let spec = FaultSpec::from_json(&r.spec_json).map_err(AgentError::InvalidSpec)?;
        let session = (!r.session_id.is_empty()).then_some(r.session_id);
        let f = self
            .manager
            .call(|reply| Command::Inject {
                spec: Box::new(spec),
                session,
                reply,
            })
            .await??;
        Ok(Response::new(f))
    }

    async fn revert(&self, req: Request<pb::RevertRequest>) -> Result<Response<pb::Fault>, Status> {
        let id = req.into_inner().fault_id;
        let f = self
            .manager
            .call(|reply| Command::Revert { id, reply })
            .await??;
        Ok(Response::new(f))
    }

    async fn list_faults(
        &self,
        req: Request<pb::ListFaultsRequest>,
    ) -> Result<Response<pb::ListFaultsResponse>, Status> {
        let include_finished = req.into_inner().include_finished;
        let faults = self
            .manager
            .call(|reply| Command::List {
                include_finished,
                reply,
            })
            .await?;
        Ok(Response::new(pb::ListFaultsResponse { faults }))
    }

    async fn revert_all(
        &self,
        _: Request<pb::RevertAllRequest>,
    ) -> Result<Response<pb::RevertAllResponse>, Status> {
        let faults = self
            .manager
            .call(|reply| Command::RevertAll {
                reason: "halt",
                reply,
            })
            .await?;
        Ok(Response::new(pb::RevertAllResponse { faults }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let rx = self.manager.subscribe();
        let stream = BroadcastStream::new(rx).filter_map(|r| match r {
            Ok(ev) => Some(Ok(ev)),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Err(Status::data_loss(format!(
                    "event stream lagged: {n} events dropped; list faults to resync"
                ))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
